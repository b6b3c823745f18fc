"""Per-request token sampling, batched: greedy, temperature, top-k, min-p, top-p, logit bias,
min-tokens, repetition / frequency / presence penalties, seeded, with log-probs and top-N.

Every rank of a TP group holds the same full-vocabulary logits, and every request carries a seed
that the TP-coordinator fixed before the broadcast, so all ranks of a replica draw the same
token without talking to each other. A request's random numbers are a pure function of its
seed, its draw number and the token id (gumbel.py: counter-based, computed for the whole batch
in tensor ops on the logits' device), and every processing step works on a request's own row,
so a request gives the same tokens in any batch, on any replica, and again after a requeue
(up to ties within float rounding, as between CPU and GPU logits).

``Sampler`` applies each request's parameters to its row as batched tensor ops (the per-request
work is building small index tensors); the tensors of a batch's parameters are built once per
batch composition and reused while it lasts. A batch of plain greedy requests (no bias, penalty
or min-tokens) is one argmax, as before.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch

from . import gumbel
from .log_probs import raw_log_probs
from .logits_processors import (
    NUCLEUS_CANDIDATES,
    Filters,
    Penalties,
    add_bias,
    apply_penalties,
    filter_logits,
    finite_candidates,
    make_filters,
    mask_tokens,
    nucleus_rows,
    threshold_rows,
    top_k_candidates,
)
from .token_counts import TokenCounts

__all__ = [
    "NUCLEUS_CANDIDATES",
    "Draw",
    "Sampler",
    "SamplingState",
    "choose_seed",
    "filter_logits",
    "prompt_seed",
    "random_seed",
    "sample",
]

SEED_BITS = 64
GREEDY_TEMPERATURE = 1e-5  # below it, sampling is greedy (vLLM's threshold)
_CANDIDATE_FRACTION = 8  # sample among candidates when they are at most 1/8 of the vocabulary
_CPU_NOISE_ELEMENTS = 1 << 17  # noise computed this many (int64) elements at a time on CPU


@dataclass
class SamplingState:
    """What one request needs to draw its tokens (its parameters and how far it is)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    held_back: frozenset[int] = frozenset()  # masked while fewer than min_tokens were drawn
    top_n: int = 0  # top-N log-probs per generated token
    slot: int = 0  # its row in the TokenCounts (penalties)
    drawn: int = 0  # tokens drawn so far: the random stream's position
    prompt_tokens: list[int] = field(default_factory=list, repr=False)  # repetition penalty

    def __post_init__(self) -> None:
        self.seed %= 1 << SEED_BITS

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def plain(self) -> bool:
        """No processing before the choice: no bias, penalty or min-tokens mask."""
        return not (self.logit_bias or self.penalized or (self.min_tokens and self.held_back))


@dataclass
class Draw:
    """One sampling step's result, per row: the token, its log-prob and its top-N
    alternatives (None where not asked for); both of the model's raw distribution."""

    tokens: list[int]
    log_probs: list[float | None]
    top_n: list[dict[int, float] | None]


def prompt_seed(prompt_tokens: list[int]) -> int:
    """A seed derived from the prompt alone: stable across runs, processes and replicas.

    Request ids and arrival order differ between replicas, so they must not feed the seed.
    """
    data = b"".join(int(t).to_bytes(8, "little", signed=True) for t in prompt_tokens)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def random_seed() -> int:
    """A fresh seed for non-deterministic sampling (chosen once, by the TP-coordinator)."""
    return int.from_bytes(os.urandom(8), "little")


def choose_seed(user_seed: int | None, prompt_tokens: list[int], deterministic: bool) -> int:
    """The seed a request samples with: the user's, else the prompt's hash, else random."""
    if user_seed is not None:
        return user_seed % (1 << SEED_BITS)
    return prompt_seed(prompt_tokens) if deterministic else random_seed()


@dataclass
class _Plan:
    """A batch composition's parameter tensors, built once and reused while it lasts."""

    states: list[SamplingState]
    plain_greedy: bool
    greedy_rows: list[int]
    sampled_rows: list[int]
    greedy_index: torch.Tensor | None = None  # None: every row (or none) is greedy
    sampled_index: torch.Tensor | None = None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, ids, values
    held_rows: list[int] = field(default_factory=list)
    penalties: Penalties | None = None
    temperature: torch.Tensor | None = None  # [S, 1] of the sampled rows
    filters: Filters | None = None


def _index(rows: list[int], total: int, device: torch.device) -> torch.Tensor | None:
    return None if len(rows) == total else torch.tensor(rows, device=device)


def _bias(states: list[SamplingState], device: torch.device):
    rows, ids, values = [], [], []
    for i, s in enumerate(states):
        if s.logit_bias:
            rows += [i] * len(s.logit_bias)
            ids += list(s.logit_bias)
            values += list(s.logit_bias.values())
    if not rows:
        return None
    return (
        torch.tensor(rows, device=device),
        torch.tensor(ids, device=device),
        torch.tensor(values, dtype=torch.float32, device=device),
    )


def _penalties(states: list[SamplingState], device: torch.device) -> Penalties | None:
    rows = [i for i, s in enumerate(states) if s.penalized]
    if not rows:
        return None
    chosen = [states[i] for i in rows]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

    return Penalties(
        rows=_index(rows, len(states), device),
        slots=torch.tensor([s.slot for s in chosen], device=device),
        slot_list=[s.slot for s in chosen],
        presence=column([s.presence_penalty for s in chosen]),
        frequency=column([s.frequency_penalty for s in chosen]),
        repetition=column([s.repetition_penalty for s in chosen]),
        any_repetition=any(s.repetition_penalty != 1.0 for s in chosen),
        any_count_penalty=any(s.presence_penalty or s.frequency_penalty for s in chosen),
    )


def _make_plan(states: list[SamplingState], vocab: int, device: torch.device) -> _Plan:
    greedy = [i for i, s in enumerate(states) if s.greedy]
    sampled = [i for i, s in enumerate(states) if not s.greedy]
    plain_greedy = not sampled and all(s.plain for s in states)
    plan = _Plan(states, plain_greedy, greedy, sampled)
    if plain_greedy:
        return plan
    if greedy and sampled:
        plan.greedy_index = torch.tensor(greedy, device=device)
        plan.sampled_index = torch.tensor(sampled, device=device)
    plan.bias = _bias(states, device)
    plan.held_rows = [i for i, s in enumerate(states) if s.min_tokens and s.held_back]
    plan.penalties = _penalties(states, device)
    if sampled:
        chosen = [states[i] for i in sampled]
        plan.temperature = torch.tensor(
            [[s.temperature] for s in chosen], dtype=torch.float32, device=device
        )
        plan.filters = make_filters(
            [s.top_k for s in chosen],
            [s.top_p for s in chosen],
            [s.min_p for s in chosen],
            vocab,
            device,
        )
    return plan


class Sampler:
    """Samples a batch's tokens; owns the per-slot token counts the penalties need."""

    def __init__(
        self,
        slots: int,
        vocab_size: int,
        device: torch.device | str = "cpu",
        max_tokens: int = 2048,
    ) -> None:
        """``max_tokens``: the longest sequence (prompt + generated) a penalized request has."""
        self.device = torch.device(device)
        self.counts = TokenCounts(slots, vocab_size, self.device, max_tokens)
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._token_ids: torch.Tensor | None = None

    def admit(self, state: SamplingState) -> None:
        """A request entered batch slot ``state.slot``: reset its token counts."""
        if state.penalized:
            self.counts.reset(state.slot, state.prompt_tokens)

    def _plan_for(self, states: list[SamplingState], vocab: int, device: torch.device) -> _Plan:
        """The batch's plan, kept while the batch lasts: the last two (a step samples its
        decoding batch and its newly admitted one). A plan holds its states, so their ids
        cannot be reused while it is kept."""
        key = tuple(map(id, states))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 2:
                del self._plans[next(iter(self._plans))]
            plan = self._plans[key] = _make_plan(states, vocab, device)
        return plan

    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState], want_log_probs: list[bool]
    ) -> Draw:
        """Sample one token per row of ``logits`` [B, V] (float32, unchanged)."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} requests")
        logits = logits.float()
        plan = self._plan_for(states, logits.shape[1], logits.device)
        if plan.plain_greedy:
            chosen = torch.argmax(logits, dim=-1)
        else:
            chosen = self._choose(logits, states, plan)
        tokens = chosen.tolist()
        for state in states:
            state.drawn += 1
        log_probs, top_n = raw_log_probs(logits, chosen, want_log_probs, [s.top_n for s in states])
        return Draw(tokens, log_probs, top_n)

    def _choose(
        self, logits: torch.Tensor, states: list[SamplingState], plan: _Plan
    ) -> torch.Tensor:
        work = logits
        if plan.bias is not None or plan.held_rows or plan.penalties is not None:
            work = logits.clone()  # the raw logits stay for the log-probs
            if plan.bias is not None:
                add_bias(work, *plan.bias)
            self._mask_held_back(work, states, plan.held_rows)
            if plan.penalties is not None:
                apply_penalties(work, plan.penalties, self.counts)
        if not plan.sampled_rows:
            chosen = torch.argmax(work, dim=-1)
        elif not plan.greedy_rows:
            chosen = self._draw(work, [states[i] for i in plan.sampled_rows], plan)
        else:
            chosen = torch.empty(len(states), dtype=torch.int64, device=work.device)
            chosen[plan.greedy_index] = torch.argmax(work[plan.greedy_index], dim=-1)
            sampled = [states[i] for i in plan.sampled_rows]
            chosen[plan.sampled_index] = self._draw(work[plan.sampled_index], sampled, plan)
        penalties = plan.penalties
        if penalties is not None:
            rows = penalties.rows
            picked = chosen if rows is None else chosen[rows]
            self.counts.add(penalties.slot_list, penalties.slots, picked)
        return chosen

    @staticmethod
    def _mask_held_back(work: torch.Tensor, states: list[SamplingState], held: list[int]) -> None:
        """min_tokens: a request's stop and termination ids are -inf until it drew enough."""
        rows, ids = [], []
        for i in held:
            s = states[i]
            if s.drawn < s.min_tokens:
                rows += [i] * len(s.held_back)
                ids += s.held_back
        if rows:
            device = work.device
            mask_tokens(work, torch.tensor(rows, device=device), torch.tensor(ids, device=device))

    def _draw(self, work: torch.Tensor, states: list[SamplingState], plan: _Plan) -> torch.Tensor:
        """Gumbel-max over the filtered, temperature-scaled rows: argmax(scaled + noise).

        Unlike inverting a cumulative sum over the vocabulary, the winner only changes when
        two perturbed scores tie within rounding, so logits that differ by float noise (another
        batch shape, another replica) still give the same token. The noise is bounded, so only
        the tokens within ``gumbel.SPAN`` of their row's best can win: when those are few (a
        top-k, a nucleus, a peaked distribution), the noise is computed for them alone (the
        same values: a function of the token id), ties going to the lowest id as argmax's.
        """
        a, b = gumbel.key_tensors([s.seed for s in states], [s.drawn for s in states], work.device)
        filters = plan.filters
        if filters is not None and filters.all_top_k:
            found = top_k_candidates(work, plan.temperature, filters)
            if found is not None:
                return self._pick(*found, a, b, work.shape[-1])
        scaled = work / plan.temperature
        vocab = scaled.shape[-1]
        if filters is not None:
            scaled = threshold_rows(scaled, filters)
            if filters.any_top_p:  # its softmax needs every finite token, not the contenders
                found = finite_candidates(scaled, filters, _CANDIDATE_FRACTION)
                if found is not None:
                    return self._pick(*found, a, b, vocab)
                nucleus_rows(scaled, filters)
        near = scaled > scaled.amax(dim=-1, keepdim=True) - gumbel.SPAN
        n = int(near.sum(dim=-1, dtype=torch.int32).max())
        if n * _CANDIDATE_FRACTION <= vocab:
            return self._pick(*torch.topk(scaled, n, dim=-1), a, b, vocab)
        return self._draw_everywhere(scaled, a, b)

    def _draw_everywhere(
        self, scaled: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """Gumbel-max with noise for the whole vocabulary. On CPU a few rows at a time: the
        noise's int64 passes then stay in cache (several times faster than whole-batch ones)."""
        rows, vocab = scaled.shape
        ids = self._ids(vocab, scaled.device)
        step = rows if scaled.device.type != "cpu" else max(1, _CPU_NOISE_ELEMENTS // vocab)
        if step >= rows:
            return torch.argmax(scaled + gumbel.noise(a, b, ids), dim=-1)
        parts = [
            torch.argmax(
                scaled[i : i + step] + gumbel.noise(a[i : i + step], b[i : i + step], ids), dim=-1
            )
            for i in range(0, rows, step)
        ]
        return torch.cat(parts)

    @staticmethod
    def _pick(
        values: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, vocab: int
    ) -> torch.Tensor:
        """The Gumbel-max winner among candidates (``values`` [S, K] at token ``ids``)."""
        score = values + gumbel.noise(a, b, ids)
        best = score.amax(dim=-1, keepdim=True)
        return torch.where(score == best, ids, vocab).amin(dim=-1)

    def _ids(self, vocab: int, device: torch.device) -> torch.Tensor:
        ids = self._token_ids
        if ids is None or ids.numel() != vocab or ids.device != device:
            ids = self._token_ids = torch.arange(vocab, device=device)
        return ids


def sample(
    logits: torch.Tensor, states: list[SamplingState], want_log_probs: list[bool]
) -> tuple[list[int], list[float | None]]:
    """Sample one token per row of ``logits`` [B, V]; return tokens and (optional) log-probs.

    Log-probs are those of the model's unmodified distribution (log-softmax of the raw logits),
    as Megatron reports them, whatever temperature or filtering chose the token. (A one-off
    Sampler: penalties see only what ``state.prompt_tokens`` holds.)
    """
    slots = max((s.slot for s in states), default=0) + 1
    longest = max((len(s.prompt_tokens) for s in states), default=0) + 1
    sampler = Sampler(slots, logits.shape[-1], logits.device, longest)
    for state in states:
        sampler.admit(state)
    draw = sampler(logits, states, want_log_probs)
    return draw.tokens, draw.log_probs
