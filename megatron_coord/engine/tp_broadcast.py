"""The per-step request broadcast inside one tensor-parallel group.

Only the TP-coordinator (TP rank 0) talks to the coordinator. Each step it packs the control
signals and new requests it drained into one int64 buffer (``megatron_coord._C.pack_step``) and
broadcasts it over the TP group with torch.distributed (a CUDA tensor over NCCL on GPU, a CPU
tensor over gloo otherwise). Followers unpack it, so every rank applies the same batch in the
same step.

To keep a decode step at one collective, the buffer travels in a fixed-size head whose first
word is the total length; only a step whose inputs overflow the head (a prompt arrived) pays a
second broadcast for the rest.

A signal with structured options (a weight update's spec, a SUSPEND that offloads the weights,
a generation epoch) travels as a *payload signal*: ``[PAYLOAD_SIGNAL, header, n_bytes, word...]``,
its msgpack bytes packed little-endian into int64 words (``payload_signal`` / ``read_payload``).

A request's sampling parameters are doubles: 11 fixed ones, then, only when the request sets
one of vLLM's / OpenAI's fields (or top-N), an extension block: those fields, the counts of
its stop ids and logit-bias entries, the stop ids, and (id, bias) pairs. A plain request packs
exactly as before the extension existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch
import torch.distributed as dist

from .. import _C
from ..parallel_state import ParallelState
from ..sampling_params import SamplingParams

# Internal signal (never on the wire): the TP-coordinator tells its followers to shut down
# (SIGINT/SIGTERM or a lost coordinator), so every rank leaves the loop at the same step.
SHUTDOWN_SIGNAL = -1
# Signals followed by one argument word (the request id).
ABORT_SIGNAL = 104
# Internal: a signal with options, [PAYLOAD_SIGNAL, header, n_bytes, msgpack bytes as words...].
PAYLOAD_SIGNAL = -2

HEAD_WORDS = 64
_EXACT = float(1 << 52)  # integers below this magnitude survive a trip through a double


@dataclass
class NewRequest:
    """A request as every rank of a replica sees it: validated, with its seed fixed."""

    request_id: int
    prompt_tokens: list[int]
    params: SamplingParams
    seed: int


@dataclass
class StepInputs:
    """Everything a replica applies in one step, identical on every rank of the group."""

    signals: list[int] = field(default_factory=list)  # Headers values; ABORT is (104, id)
    requests: list[NewRequest] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.signals or self.requests)


def payload_signal(header: int, payload: Any) -> list[int]:
    """The signal words that carry ``header`` with ``payload`` (anything msgpack encodes)."""
    data = msgspec.msgpack.encode(payload)
    padded = data + b"\0" * (-len(data) % 8)
    words = np.frombuffer(padded, dtype="<i8").tolist()
    return [PAYLOAD_SIGNAL, int(header), len(data), *words]


def read_payload(signals: list[int], i: int) -> tuple[int, Any, int]:
    """The payload signal at ``signals[i]``: (header, payload, index after it)."""
    if i + 2 >= len(signals):
        raise ValueError("truncated payload signal")
    header, n = signals[i + 1], signals[i + 2]
    end = i + 3 + -(-n // 8)
    if n < 0 or end > len(signals):
        raise ValueError(f"payload signal of {n} bytes overruns the step's signals")
    data = np.array(signals[i + 3 : end], dtype="<i8").tobytes()[:n]
    return header, msgspec.msgpack.decode(data), end


def _clamp_int(value: int) -> float:
    return float(max(-_EXACT, min(_EXACT, value)))


def _optional(value: int | None) -> float:
    return math.nan if value is None else _clamp_int(value)


_FIXED = 11  # the numeric fields every request carries
# vLLM's / OpenAI's fields (and Megatron's top-N ones): appended only when one is not at its
# default, then the stop ids and the (id, bias) pairs, so a plain request packs as before.
_EXTENSION_FIELDS = (
    "ignore_eos",
    "min_tokens",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "top_n_logprobs",
    "return_prompt_top_n_logprobs",
    "include_stop_str_in_output",
    "skip_special_tokens",
)
_BOOL_EXTENSIONS = frozenset(
    {
        "ignore_eos",
        "return_prompt_top_n_logprobs",
        "include_stop_str_in_output",
        "skip_special_tokens",
    }
)
_INT_EXTENSIONS = frozenset({"min_tokens", "top_n_logprobs"})
_DEFAULTS = SamplingParams()
_EXTENDED = _FIXED + len(_EXTENSION_FIELDS) + 2  # + the stop-id and bias counts


def _extended(params: SamplingParams) -> bool:
    return bool(params.stop_token_ids or params.logit_bias) or any(
        getattr(params, name) != getattr(_DEFAULTS, name) for name in _EXTENSION_FIELDS
    )


def encode_params(params: SamplingParams, seed: int) -> list[float]:
    """The sampling fields an engine acts on, as doubles (the seed split in halves; token ids
    are below the vocabulary size, exact in a double)."""
    seed %= 1 << 64
    values = [
        float(params.temperature),
        _clamp_int(params.top_k),
        float(params.top_p),
        _clamp_int(params.num_tokens_to_generate),
        _optional(params.num_tokens_total),
        _optional(params.termination_id),
        float(params.return_log_probs),
        float(params.skip_prompt_log_probs),
        _clamp_int(params.streaming_interval),
        float(seed & 0xFFFFFFFF),
        float(seed >> 32),
    ]
    if not _extended(params):
        return values
    for name in _EXTENSION_FIELDS:
        value = getattr(params, name)
        values.append(_clamp_int(value) if name in _INT_EXTENSIONS else float(value))
    stops = params.stop_token_ids or []
    bias = params.logit_bias or {}
    values += [float(len(stops)), float(len(bias))]
    values += [_clamp_int(t) for t in stops]
    for token, value in bias.items():
        values += [_clamp_int(token), float(value)]
    return values


def _opt_int(value: float) -> int | None:
    return None if math.isnan(value) else int(value)


def _decode_extension(values: list[float], params: SamplingParams) -> None:
    for name, value in zip(_EXTENSION_FIELDS, values[_FIXED:], strict=False):
        if name in _BOOL_EXTENSIONS:
            value = bool(value)
        elif name in _INT_EXTENSIONS:
            value = int(value)
        setattr(params, name, value)
    n_stops, n_bias = int(values[_EXTENDED - 2]), int(values[_EXTENDED - 1])
    if n_stops < 0 or n_bias < 0 or len(values) != _EXTENDED + n_stops + 2 * n_bias:
        raise ValueError(f"sampling parameters: bad lengths {n_stops}, {n_bias}")
    stops = values[_EXTENDED : _EXTENDED + n_stops]
    pairs = values[_EXTENDED + n_stops :]
    params.stop_token_ids = [int(t) for t in stops] or None
    params.logit_bias = {int(t): b for t, b in zip(pairs[::2], pairs[1::2], strict=True)} or None


def decode_params(values: list[float]) -> tuple[SamplingParams, int]:
    """Inverse of encode_params; raises ValueError on a vector of the wrong length."""
    if len(values) < _FIXED or (_FIXED < len(values) < _EXTENDED):
        raise ValueError(
            f"expected {_FIXED} or at least {_EXTENDED} sampling parameters, got {len(values)}"
        )
    params = SamplingParams(
        temperature=values[0],
        top_k=int(values[1]),
        top_p=values[2],
        num_tokens_to_generate=int(values[3]),
        num_tokens_total=_opt_int(values[4]),
        termination_id=_opt_int(values[5]),
        return_log_probs=bool(values[6]),
        skip_prompt_log_probs=bool(values[7]),
        streaming_interval=int(values[8]),
    )
    if len(values) > _FIXED:
        _decode_extension(values, params)
    return params, int(values[9]) | (int(values[10]) << 32)


def pack(inputs: StepInputs) -> torch.Tensor:
    """One int64 CPU tensor holding ``inputs`` (C++ extension)."""
    reqs = inputs.requests
    return _C.pack_step(
        inputs.signals,
        [r.request_id for r in reqs],
        [r.prompt_tokens for r in reqs],
        [encode_params(r.params, r.seed) for r in reqs],
    )


def unpack(buffer: torch.Tensor) -> StepInputs:
    """Inverse of pack; raises ValueError on a corrupt buffer."""
    signals, ids, tokens, params = _C.unpack_step(buffer)
    requests = []
    for rid, toks, values in zip(ids, tokens, params, strict=True):
        sampling, seed = decode_params(values)
        requests.append(NewRequest(rid, toks, sampling, seed))
    return StepInputs(signals, requests)


class TPBroadcaster:
    """Moves one StepInputs per step from the TP-coordinator to every rank of its group."""

    def __init__(self, state: ParallelState, head_words: int = HEAD_WORDS) -> None:
        self.state = state
        self.head_words = head_words
        self.enabled = state.tensor_parallel_size > 1
        # NCCL moves only CUDA tensors; gloo moves CPU ones.
        self.device = state.device if state.backend == "nccl" else torch.device("cpu")
        # A CPU staging head, written and read through numpy (cheaper than tensor indexing);
        # on NCCL it is copied to/from a device head for the collective.
        self.stage = torch.zeros(head_words, dtype=torch.int64)
        if self.device.type == "cuda":
            self.stage = self.stage.pin_memory()
            self.head = torch.zeros(head_words, dtype=torch.int64, device=self.device)
        else:
            self.head = self.stage
        self.stage_np = self.stage.numpy()

    def _broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=self.state.tp_src_rank, group=self.state.tp_group)

    def exchange(self, inputs: StepInputs | None) -> StepInputs:
        """Collective over the TP group: the source passes its inputs, followers pass None.

        Returns the same StepInputs on every rank. With T == 1 it returns ``inputs`` as is.
        """
        if not self.enabled:
            return inputs if inputs is not None else StepInputs()
        if self.state.is_tp_coordinator:
            if inputs is None:
                raise ValueError("the TP-coordinator must provide the step's inputs")
            return self._send(inputs)
        return self._receive()

    def _send(self, inputs: StepInputs) -> StepInputs:
        buffer = pack(inputs)
        words = buffer.numpy()
        n = len(words)
        fits = min(n, self.head_words - 1)
        self.stage_np[0] = n
        self.stage_np[1 : 1 + fits] = words[:fits]
        if self.head is not self.stage:
            # Synchronous: the next step rewrites the staging head, so this copy must be done.
            self.head.copy_(self.stage)
        self._broadcast(self.head)
        if n > fits:
            self._broadcast(buffer[fits:].to(self.device))
        return inputs

    def _receive(self) -> StepInputs:
        self._broadcast(self.head)
        if self.head is not self.stage:
            self.stage.copy_(self.head)
        n = int(self.stage_np[0])
        if n < 2 or n > (1 << 40):
            raise ValueError(f"TP broadcast: bad buffer length {n}")
        fits = min(n, self.head_words - 1)
        # A view is enough: unpack copies into Python objects before the head is reused.
        buffer = self.stage[1 : 1 + fits]
        if n > fits:
            rest = torch.empty(n - fits, dtype=torch.int64, device=self.device)
            self._broadcast(rest)
            buffer = torch.cat([buffer, rest.cpu()])
        return unpack(buffer)
