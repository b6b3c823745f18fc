"""Batched logits processing: every request's own parameters applied to its row of [B, V].

Each function works on whole rows with per-row parameter tensors ([R, 1]); the only per-request
work is building small index tensors (a request's logit-bias ids, its stop ids). Rows are
independent: a row's result never depends on the other rows, so a request is processed the
same in any batch.

Order (vLLM's): logit bias, the min-tokens mask, penalties (repetition, then frequency and
presence), then for sampled rows temperature and the filters (top-k and min-p, which commute,
then top-p over what they kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .token_counts import TokenCounts

NUCLEUS_CANDIDATES = 1024  # top-p looks here first; a full sort only when these are not enough
NEG_INF = float("-inf")


def add_bias(work: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> None:
    """``work[rows[i], ids[i]] += bias[i]`` in place (a request's ids are distinct)."""
    work.index_put_((rows, ids), bias, accumulate=True)


def mask_tokens(work: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> None:
    """``work[rows[i], ids[i]] = -inf`` in place."""
    work.index_put_((rows, ids), torch.tensor(NEG_INF, device=work.device))


@dataclass
class Penalties:
    """The penalized rows of a batch and their parameters ([P, 1] float tensors)."""

    rows: torch.Tensor | None  # row indices into the batch (None: every row)
    slots: torch.Tensor  # their rows in TokenCounts
    slot_list: list[int]
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    any_repetition: bool
    any_count_penalty: bool


def apply_penalties(work: torch.Tensor, spec: Penalties, counts: TokenCounts) -> torch.Tensor:
    """Repetition (HF/vLLM: over prompt and generated tokens, a seen token's logit divided by
    the penalty if positive, multiplied if not), then ``logit -= frequency * count + presence *
    [count > 0]`` over generated tokens. Returns ``work`` (changed in place).

    Only the ids each row has seen are touched: gathered, penalized, scattered back. An id
    listed twice is computed twice from the same logit and count, so both writes agree.
    """
    width = max(counts.lengths[s] for s in spec.slot_list)
    if width == 0:
        return work
    ids = counts.seen[spec.slots, :width]
    rows = None if spec.rows is None else spec.rows[:, None]
    values = work.gather(1, ids) if rows is None else work[rows, ids]
    if spec.any_repetition:
        values = torch.where(values > 0, values / spec.repetition, values * spec.repetition)
    if spec.any_count_penalty:
        flat = spec.slots[:, None] * counts.vocab_size + ids
        n = torch.take(counts.counts, flat).to(values.dtype)
        values = values - spec.frequency * n - spec.presence * (n > 0).to(values.dtype)
    if rows is None:
        work.scatter_(1, ids, values)
    else:
        work[rows, ids] = values
    return work


@dataclass
class Filters:
    """Sampled rows' filters: top-k, min-p, top-p (rows without one hold a neutral value)."""

    top_k: torch.Tensor | None  # [S, 1] long: k - 1 for rows with 0 < k < V (others: 0)
    top_k_rows: torch.Tensor | None  # [S, 1] bool: rows with 0 < k < V
    k_max: int  # largest such k (0: none)
    log_min_p: torch.Tensor | None  # [S, 1]: log(min_p), -inf for rows without
    top_p_rows: torch.Tensor | None  # indices of rows with 0 < top_p < 1 (None: all rows)
    top_p: torch.Tensor | None  # [P, 1] of those rows
    nucleus_candidates: int  # how many tokens top-p looks at first
    any_top_p: bool
    all_top_k: bool  # every row has a top-k: its candidates are found first (top_k_candidates)


def filter_rows(scaled: torch.Tensor, spec: Filters) -> torch.Tensor:
    """Mask (to -inf) each row's tokens outside its top-k, below its min-p and outside its
    top-p nucleus. ``scaled`` is temperature-scaled; the result may be it, changed in place."""
    scaled = threshold_rows(scaled, spec)
    if spec.any_top_p:
        nucleus_rows(scaled, spec)
    return scaled


def threshold_rows(scaled: torch.Tensor, spec: Filters) -> torch.Tensor:
    """The top-k and min-p masks of ``filter_rows`` (in place): both keep what lies at or
    above a per-row threshold, so they commute."""
    threshold = None
    if spec.k_max:
        kth = torch.topk(scaled, spec.k_max, dim=-1).values.gather(1, spec.top_k)
        threshold = kth.masked_fill_(~spec.top_k_rows, NEG_INF)
    if spec.log_min_p is not None:
        floor = scaled.amax(dim=-1, keepdim=True) + spec.log_min_p
        threshold = floor if threshold is None else torch.maximum(threshold, floor)
    if threshold is not None:
        scaled = scaled.masked_fill_(scaled < threshold, NEG_INF)
    return scaled


def nucleus_rows(scaled: torch.Tensor, spec: Filters) -> None:
    """Top-p in place: keep a token while the tokens ranked above it hold no more than top_p
    (the first always stays). Searched among the likeliest ``nucleus_candidates`` tokens (a
    partial top-k), sorting the whole vocabulary only when they hold no more than top_p."""
    rows = spec.top_p_rows
    sub = scaled if rows is None else scaled[rows]
    probs = torch.softmax(sub, dim=-1)
    vocab = probs.shape[-1]
    k = min(vocab, spec.nucleus_candidates)
    values, order = torch.topk(probs, k, dim=-1)
    cumulative = torch.cumsum(values, dim=-1)
    if k < vocab and not bool((cumulative[:, -1:] > spec.top_p).all()):
        values, order = torch.sort(probs, dim=-1, descending=True)
        cumulative = torch.cumsum(values, dim=-1)
    keep = (cumulative - values) <= spec.top_p
    kept = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, order, keep)
    sub = sub.masked_fill_(~kept, NEG_INF)
    if rows is not None:
        scaled[rows] = sub


def nucleus_of_candidates(values: torch.Tensor, spec: Filters) -> torch.Tensor:
    """``nucleus_rows`` on rows of candidates sorted in descending order that hold every token
    still finite (so their softmax is the row's): in place."""
    rows = spec.top_p_rows
    sub = values if rows is None else values[rows]
    probs = torch.softmax(sub, dim=-1)
    dropped = (torch.cumsum(probs, dim=-1) - probs) > spec.top_p
    sub = sub.masked_fill_(dropped, NEG_INF)
    if rows is not None:
        values[rows] = sub
    return values


def finite_candidates(
    scaled: torch.Tensor, spec: Filters, fraction: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """After ``threshold_rows``: when every row keeps at most 1/``fraction`` of the vocabulary,
    the rest of ``filter_rows`` among those (values in descending order, token ids); else
    None."""
    # (isfinite, or a bool sum into int64, costs several times more)
    n = int((scaled > NEG_INF).sum(dim=-1, dtype=torch.int32).max())
    if n * fraction > scaled.shape[-1]:
        return None
    values, ids = torch.topk(scaled, n, dim=-1)
    if spec.any_top_p:
        nucleus_of_candidates(values, spec)
    return values, ids


def top_k_candidates(
    work: torch.Tensor, temperature: torch.Tensor, spec: Filters
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``filter_rows`` for rows that all have a top-k, done among each row's k best alone:
    (scaled values [S, k_max + 1] with -inf where filtered, their token ids), in descending
    order. None when some row's k-th value ties the next one (``filter_rows`` keeps ties:
    the caller takes the whole-vocabulary path then)."""
    values, ids = torch.topk(work, spec.k_max + 1, dim=-1)
    k = spec.top_k + 1
    if bool((values.gather(1, k) == values.gather(1, spec.top_k)).any()):
        return None
    positions = torch.arange(values.shape[1], device=values.device)[None]
    values = values.masked_fill_(positions >= k, NEG_INF).div_(temperature)
    if spec.log_min_p is not None:
        values = values.masked_fill_(values < values[:, :1] + spec.log_min_p, NEG_INF)
    if spec.any_top_p:
        nucleus_of_candidates(values, spec)
    return values, ids


def make_filters(
    top_k: list[int], top_p: list[float], min_p: list[float], vocab: int, device: torch.device
) -> Filters | None:
    """The Filters of rows with these parameters (None: no row filters anything)."""
    k_rows = [0 < k < vocab for k in top_k]
    p_rows = [i for i, p in enumerate(top_p) if 0.0 < p < 1.0]
    any_min_p = any(m > 0.0 for m in min_p)
    if not any(k_rows) and not p_rows and not any_min_p:
        return None
    k_max = max((k for k, on in zip(top_k, k_rows, strict=True) if on), default=0)
    as_column = torch.tensor  # small [S, 1] tensors
    spec = Filters(
        top_k=None,
        top_k_rows=None,
        k_max=k_max,
        log_min_p=None,
        top_p_rows=None,
        top_p=None,
        nucleus_candidates=NUCLEUS_CANDIDATES,
        any_top_p=bool(p_rows),
        all_top_k=all(k_rows),
    )
    if k_max:
        spec.top_k = as_column(
            [[k - 1 if on else 0] for k, on in zip(top_k, k_rows, strict=True)], device=device
        )
        spec.top_k_rows = as_column([[on] for on in k_rows], device=device)
    if any_min_p:
        logs = [math.log(m) if m > 0.0 else NEG_INF for m in min_p]
        spec.log_min_p = as_column([[v] for v in logs], device=device)
    if p_rows:
        # A row with top-k keeps at most k tokens (ties aside): its nucleus lies among them.
        caps = [top_k[i] if k_rows[i] else NUCLEUS_CANDIDATES for i in p_rows]
        spec.nucleus_candidates = max(caps)
        if len(p_rows) < len(top_p):
            spec.top_p_rows = torch.tensor(p_rows, device=device)
        spec.top_p = as_column([[top_p[i]] for i in p_rows], device=device)
    return spec


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k set and the top-p nucleus of a 1-D row
    (``filter_rows`` for one row)."""
    spec = make_filters([top_k], [top_p], [0.0], logits.numel(), logits.device)
    if spec is None:
        return logits
    return filter_rows(logits[None].clone(), spec)[0]
