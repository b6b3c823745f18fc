"""Per-request sampling parameters, field-compatible with Megatron-core 0.16's and 0.19's
SamplingParams."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .protocol import ErrorCode, ProtocolError


@dataclass
class SamplingParams:
    """How to sample one request. Field names and defaults are Megatron-core's.

    ``top_k=1`` is greedy. ``top_p=0.0`` and ``top_k=0`` mean "no filtering". ``seed`` (ours)
    makes sampling reproducible for one request; in ``deterministic_mode`` engines derive a seed
    from the request when none is given.
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
    # --- vLLM's / OpenAI's sampling fields (issue 23's contract; all off by default) ---
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
_INT_FIELDS = {
    "top_k",
    "num_tokens_to_generate",
    "top_n_logprobs",
    "streaming_interval",
    "min_tokens",
}
_OPTIONAL_INT_FIELDS = {"num_tokens_total", "termination_id", "seed"}
_FLOAT_FIELDS = {
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
}
_BOOL_FIELDS = {
    "return_log_probs",
    "skip_prompt_log_probs",
    "return_segments",
    "return_prompt_top_n_logprobs",
    "add_BOS",
    "detokenize_stop_sequence",
    "return_prompt_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
}


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message)


def _check_field(name: str, value: Any) -> Any:
    if name in _BOOL_FIELDS:
        if type(value) is not bool:
            raise _bad(f"sampling_params.{name} must be a bool")
    elif name in _INT_FIELDS or (name in _OPTIONAL_INT_FIELDS and value is not None):
        if type(value) is not int:
            raise _bad(f"sampling_params.{name} must be an integer")
    elif name in _FLOAT_FIELDS:
        if type(value) not in (int, float) or value != value:
            raise _bad(f"sampling_params.{name} must be a number")
        value = float(value)
    elif (
        name == "stop_words"
        and value is not None
        and not (isinstance(value, list) and all(isinstance(w, str) for w in value))
    ):
        raise _bad("sampling_params.stop_words must be a list of strings")
    elif (
        name == "stop_token_ids"
        and value is not None
        and not (isinstance(value, list) and all(type(t) is int for t in value))
    ):
        raise _bad("sampling_params.stop_token_ids must be a list of integers")
    elif name == "logit_bias" and value is not None:
        if not isinstance(value, dict) or not all(
            type(k) is int and type(v) in (int, float) for k, v in value.items()
        ):
            raise _bad("sampling_params.logit_bias must map integer token ids to numbers")
        value = {k: float(v) for k, v in value.items()}
    return value


def validate_sampling_params(data: Any) -> dict[str, Any]:
    """Check a wire dict of sampling params and return a cleaned copy.

    Unknown keys are refused (a typo must not be silently ignored); ranges are checked so an
    engine never sees a value it cannot act on.
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
    if clean.get("temperature", 1.0) < 0:
        raise _bad("sampling_params.temperature must be >= 0")
    if clean.get("top_k", 0) < 0:
        raise _bad("sampling_params.top_k must be >= 0")
    if not 0.0 <= clean.get("top_p", 0.0) <= 1.0:
        raise _bad("sampling_params.top_p must be in [0, 1]")
    if clean.get("num_tokens_to_generate", 30) < 0:
        raise _bad("sampling_params.num_tokens_to_generate must be >= 0")
    if clean.get("streaming_interval", 0) < 0:
        raise _bad("sampling_params.streaming_interval must be >= 0")
    return clean
