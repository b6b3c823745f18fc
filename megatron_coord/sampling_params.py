"""Per-request sampling parameters, field-compatible with Megatron-core 0.16's and 0.19's
SamplingParams, plus vLLM's and OpenAI's sampling fields (off by default).

``validate_sampling_params`` is the one check of a wire dict: types, ranges and sizes, so that
no value can overflow the wire (msgpack's 64-bit integers, the TP broadcast's doubles) or the
engine. The HTTP front end checks the same bounds at its edge (``BOUNDS`` and the ``MAX_*``
sizes below); token ids below the vocabulary size are the engine's own check.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .protocol import ErrorCode, ProtocolError

MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_TOP_N_LOGPROBS = 20
MAX_ABS_LOGIT_BIAS = 100.0
INT64_MAX = (1 << 63) - 1


@dataclass
class SamplingParams:
    """How to sample one request. Megatron's field names and defaults come first.

    ``top_k=1`` is greedy. ``top_p=0.0`` and ``top_k=0`` mean "no filtering". ``seed`` (ours)
    makes sampling reproducible for one request; in ``deterministic_mode`` engines derive a seed
    from the request when none is given.

    The vLLM/OpenAI fields (all off by default): ``ignore_eos`` (the termination id does not
    end the request), ``min_tokens`` (termination and stop ids are masked until this many
    tokens were generated), ``stop_token_ids`` (more ids that end it, finish reason "stop"),
    ``min_p`` (drop tokens below ``min_p`` x the top probability, after temperature),
    ``presence_penalty`` / ``frequency_penalty`` (over generated tokens: logit -= presence *
    [count > 0] + frequency * count), ``repetition_penalty`` (over prompt and generated tokens:
    a seen token's logit is divided by it if positive, multiplied if not), ``logit_bias``
    (token id -> bias added to its logit), ``include_stop_str_in_output`` (carried for the HTTP
    front end) and ``skip_special_tokens`` (the coordinator's detokenization).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    return_log_probs: bool = False
    skip_prompt_log_probs: bool = False
    return_segments: bool = False
    num_tokens_to_generate: int = 30
    num_tokens_total: int | None = None
    termination_id: int | None = None
    top_n_logprobs: int = 0
    return_prompt_top_n_logprobs: bool = False
    add_BOS: bool = False
    stop_words: list[str] | None = None
    # --- Megatron-core 0.19's additions (accepted; our engines return prompt tokens anyway) ---
    detokenize_stop_sequence: bool = False
    return_prompt_tokens: bool = False
    # --- megatron_coord extensions ---
    seed: int | None = None
    streaming_interval: int = 0  # >0: send partial results at most every N engine steps
    # --- vLLM's / OpenAI's sampling fields ---
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def serialize(self) -> dict[str, Any]:
        """A msgpack-serializable dict (what goes on the wire)."""
        return self.__dict__.copy()

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a wire dict, validating every field; raises ProtocolError on bad input."""
        return cls(**validate_sampling_params(data))


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(SamplingParams)}
_BOOL_FIELDS = frozenset(name for name, kind in _FIELD_TYPES.items() if kind == "bool")
# Integer fields and their inclusive ranges (None: the field may be null).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "top_k": (0, INT64_MAX),
    "num_tokens_to_generate": (0, INT64_MAX),
    "num_tokens_total": (0, INT64_MAX),
    "termination_id": (-INT64_MAX - 1, INT64_MAX),  # negative: never generated (no stop)
    "top_n_logprobs": (0, MAX_TOP_N_LOGPROBS),
    "streaming_interval": (0, INT64_MAX),
    "seed": (-INT64_MAX - 1, (1 << 64) - 1),  # msgpack's range; folded to 64 bits
    "min_tokens": (0, INT64_MAX),
}
_OPTIONAL = frozenset({"num_tokens_total", "termination_id", "seed"})
# Float fields and their inclusive ranges (every float must also be finite).
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, math.inf),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.01, 100.0),
}
# What the HTTP front end checks at its edge: the same numbers.
BOUNDS: dict[str, tuple[float, float]] = {**_INT_RANGES, **_FLOAT_RANGES}


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message)


def _check_int(name: str, value: Any) -> int:
    if type(value) is not int:
        raise _bad(f"sampling_params.{name} must be an integer")
    low, high = _INT_RANGES[name]
    if not low <= value <= high:
        raise _bad(f"sampling_params.{name} must be in [{low}, {high}], got {value}")
    return value


def _check_float(name: str, value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(f"sampling_params.{name} must be a finite number")
    low, high = _FLOAT_RANGES[name]
    if not low <= value <= high:
        raise _bad(f"sampling_params.{name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _check_token_id(name: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        raise _bad(f"sampling_params.{name}: token ids must be integers in [0, 2**63)")
    return value


def _check_stop_token_ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad("sampling_params.stop_token_ids must be a list of token ids")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise _bad(f"sampling_params.stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids")
    return [_check_token_id("stop_token_ids", t) for t in value]


def _bias_key(key: Any) -> Any:
    """A JSON-born map has string keys: "50256" means token 50256."""
    if type(key) is str and key.isascii() and key.isdigit() and len(key) < 20:
        return int(key)
    return key


def _check_logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("sampling_params.logit_bias must be a map of token id to bias")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise _bad(f"sampling_params.logit_bias: at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    clean: dict[int, float] = {}
    for key, bias in value.items():
        token = _check_token_id("logit_bias", _bias_key(key))
        if type(bias) not in (int, float) or not math.isfinite(bias):
            raise _bad("sampling_params.logit_bias: biases must be finite numbers")
        if abs(bias) > MAX_ABS_LOGIT_BIAS:
            raise _bad(f"sampling_params.logit_bias: biases must be in [-100, 100], got {bias}")
        clean[token] = float(bias)
    return clean


def _is_word_list(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(w, str) for w in value))


def _check_field(name: str, value: Any) -> Any:
    if name in _BOOL_FIELDS:
        if type(value) is not bool:
            raise _bad(f"sampling_params.{name} must be a bool")
    elif name in _INT_RANGES:
        if value is not None or name not in _OPTIONAL:
            value = _check_int(name, value)
    elif name in _FLOAT_RANGES:
        value = _check_float(name, value)
    elif name == "stop_token_ids":
        value = _check_stop_token_ids(value)
    elif name == "logit_bias":
        value = _check_logit_bias(value)
    elif name == "stop_words" and not _is_word_list(value):
        raise _bad("sampling_params.stop_words must be a list of strings")
    return value


def validate_sampling_params(data: Any) -> dict[str, Any]:
    """Check a wire dict of sampling params and return a cleaned copy.

    Unknown keys are refused (a typo must not be silently ignored); ranges are checked so an
    engine never sees a value it cannot act on (the ProtocolError names the field).
    """
    if not isinstance(data, dict):
        raise _bad("sampling_params must be a map")
    clean = {}
    for name, value in data.items():
        if name not in _FIELD_TYPES:
            raise _bad(f"unknown sampling parameter {name!r}")
        if name == "num_tokens_to_generate" and value is None:
            continue  # 0.19's default (None): the budget comes from num_tokens_total or ours
        clean[name] = _check_field(name, value)
    return clean
