"""A request inside the engine: how it samples and stops, what it produced, and the
Megatron-shaped record it leaves as (plus the result types of a step).

Which weights produced its tokens, and computed the KV they were decoded over, is kept as
*marks*, ``(first index, version)``, set at admission and at each weight update (never per
token): ``weight_version_spans`` over its generated tokens and ``kv_version_spans`` over the
positions whose KV its tokens attended to (prompt + generated - 1: the newest token's KV is
computed by the step after it), both ``[[start, end, version], ...]`` (weight_versions.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..sampling_params import SamplingParams
from .sampling import SamplingState
from .tp_broadcast import NewRequest
from .weight_versions import spans


def stop_ids(params: SamplingParams, default_termination: frozenset[int]) -> frozenset[int]:
    """The token ids that end a request ("stop"): its termination id (the engine's default when
    it names none) unless ``ignore_eos``, and its ``stop_token_ids``."""
    stops: frozenset[int] = frozenset()
    if not params.ignore_eos:
        stops = (
            frozenset([params.termination_id])
            if params.termination_id is not None
            else default_termination
        )
    if params.stop_token_ids:
        stops = stops | frozenset(params.stop_token_ids)
    return stops


def sampling_state(new: NewRequest, stops: frozenset[int], vocab_size: int) -> SamplingState:
    """A fresh sampler for ``new`` (at its first token: a requeue starts over with one). Its
    min-tokens mask holds the stop ids that are tokens (a termination id of -1 is none)."""
    p = new.params
    return SamplingState(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=new.seed,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        logit_bias=p.logit_bias or None,
        min_tokens=p.min_tokens,
        held_back=frozenset(t for t in stops if 0 <= t < vocab_size)
        if p.min_tokens
        else frozenset(),
        top_n=p.top_n_logprobs,
        prompt_tokens=new.prompt_tokens,
    )


@dataclass
class RunningRequest:
    """A request inside the engine: its sampling state, KV slot and output so far."""

    new: NewRequest
    sampler: SamplingState
    max_new_tokens: int
    termination_ids: frozenset[int]
    slot: int | None = None
    blocks: list[int] = field(default_factory=list)  # KV block table (positions in order)
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache (not prefilled)
    hashes: list[int] = field(default_factory=list)  # names of its full blocks known so far
    named: int = 0  # leading blocks of the table already named (registered or reused)
    generated: list[int] = field(default_factory=list)
    log_probs: list[float] | None = None
    top_n: list[dict[int, float]] | None = None  # per generated token (top_n_logprobs > 0)
    prompt_log_probs: list[float] | None = None
    prompt_top_n: list[dict[int, float]] | None = None
    streamed: int = 0  # generated tokens already sent as partial replies
    steps_since_stream: int = 0
    # (first generated index, version) of the weights that produced its tokens, and (first
    # position, version) of those that computed its KV; salt: its blocks' (kv_blocks.py).
    weight_marks: list[tuple[int, str]] = field(default_factory=list)
    kv_marks: list[tuple[int, str]] = field(default_factory=list)
    salt: int = 0

    @property
    def request_id(self) -> int:
        return self.new.request_id

    @property
    def length(self) -> int:
        return len(self.new.prompt_tokens) + len(self.generated)

    @property
    def wants_prompt_scores(self) -> bool:
        """Prompt log-probs or prompt top-N: every prompt position's logits are needed."""
        p = self.new.params
        log_probs = p.return_log_probs and not p.skip_prompt_log_probs
        return log_probs or (p.top_n_logprobs > 0 and p.return_prompt_top_n_logprobs)

    def tokens(self, start: int, end: int) -> list[int]:
        """Its tokens (prompt, then generated) in ``[start, end)``."""
        prompt = self.new.prompt_tokens
        if end <= len(prompt):
            return prompt[start:end]
        cut = len(prompt)
        return prompt[start:] + self.generated[max(0, start - cut) : end - cut]

    def reset_output(self) -> None:
        """Nothing generated yet (a new request, or a requeued one starting over)."""
        p = self.new.params
        self.generated = []
        self.log_probs = [] if p.return_log_probs else None
        self.top_n = [] if p.top_n_logprobs > 0 else None
        self.prompt_log_probs = self.prompt_top_n = None
        self.streamed = self.steps_since_stream = 0
        self.weight_marks = []
        self.kv_marks = []

    def version_spans(self) -> dict[str, list[list[Any]]]:
        """``weight_version_spans`` and ``kv_version_spans`` of what it generated so far."""
        generated = len(self.generated)
        kv_end = len(self.new.prompt_tokens) + generated - 1 if generated else 0
        return {
            "weight_version_spans": spans(self.weight_marks, generated),
            "kv_version_spans": spans(self.kv_marks, kv_end),
        }

    @property
    def first_version(self) -> str | None:
        """The version of the weights that produced its first token (None: none yet)."""
        return self.weight_marks[0][1] if self.weight_marks and self.generated else None

    def partial(self) -> list[Any]:
        """The streaming chunk of what it generated since the last one: ``[id, tokens]``, and
        the new tokens' log-probs / top-N (``[id, tokens, extras]``) when it asked for them."""
        start = self.streamed
        chunk: list[Any] = [self.request_id, self.generated[start:]]
        extras = self.version_spans()
        if self.log_probs is not None:
            extras["generated_log_probs"] = self.log_probs[start:]
        if self.top_n is not None:
            extras["generated_top_n_logprobs"] = self.top_n[start:]
        if not self.new.params.skip_special_tokens:
            extras["skip_special_tokens"] = False
        chunk.append(extras)
        self.streamed = len(self.generated)
        return chunk

    def record(self, reason: str, data_parallel_rank: int) -> dict[str, Any]:
        """Its finished record (Megatron's shape: ``{"requests": [request]}``); ``reason``
        "abort" (an ABORT) and "aborted" (a weight update's) end it as ABORTED."""
        request = {
            "request_id": self.request_id,
            "prompt": None,
            "prompt_tokens": list(self.new.prompt_tokens),
            "generated_tokens": list(self.generated),
            "generated_length": len(self.generated),
            "generated_log_probs": self.log_probs,
            "prompt_log_probs": self.prompt_log_probs,
            "generated_top_n_logprobs": self.top_n,
            "prompt_top_n_logprobs": self.prompt_top_n,
            "cached_tokens": self.cached_tokens,
            "status": "ABORTED" if reason in ("abort", "aborted") else "COMPLETED",
            "finish_reason": reason,
            "data_parallel_rank": data_parallel_rank,
            **self.version_spans(),
        }
        if not self.new.params.skip_special_tokens:
            request["skip_special_tokens"] = False  # the coordinator's detokenization
        return {"requests": [request]}


@dataclass
class StepResult:
    """What one step produced: finished records and streaming chunks ([request_id, tokens]
    or [request_id, tokens, extras], see ``RunningRequest.partial``)."""

    finished: list[dict[str, Any]] = field(default_factory=list)
    partial: list[list[Any]] = field(default_factory=list)
    tokens: int = 0  # tokens generated in this step
    prefill_tokens: int = 0  # prompt tokens prefilled in this step


@dataclass
class PendingStep:
    """A computed step awaiting ``commit_step``: its batch and the first error it raised."""

    decoding: list[RunningRequest]
    admitted: list[RunningRequest]
    prefill_tokens: int = 0
    error: Exception | None = None
