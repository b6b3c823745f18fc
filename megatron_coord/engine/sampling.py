"""Per-request token sampling: greedy, temperature, top-k, top-p, seeded, with log-probs.

Every rank of a TP group holds the same full-vocabulary logits, and every request carries a seed
that the TP-coordinator fixed before the broadcast, so all ranks of a replica draw the same
token without talking to each other. Random numbers come from a per-request CPU
``torch.Generator`` (a fixed number of draws per token), so a request gives the same tokens on CPU and
GPU, in any batch, on any replica.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch

SEED_BITS = 64


@dataclass
class SamplingState:
    """What one request needs to draw its next token."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        # manual_seed takes a uint64; fold any integer into that range.
        self.generator.manual_seed(self.seed % (1 << SEED_BITS))

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0


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


NUCLEUS_CANDIDATES = 1024  # top-p looks here first; a full sort only when these are not enough


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k set and the top-p nucleus of a 1-D row.

    The nucleus is searched among the likeliest NUCLEUS_CANDIDATES tokens (a partial top-k)
    and falls back to sorting the whole vocabulary only when they hold no more than top_p of
    the mass, so the common case costs a fraction of a full 50k-entry sort.
    """
    vocab = logits.numel()
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if not 0.0 < top_p < 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    k = min(vocab, top_k if 0 < top_k < vocab else NUCLEUS_CANDIDATES)
    values, order = torch.topk(probs, k)
    cumulative = torch.cumsum(values, dim=-1)
    if k < vocab and not bool(cumulative[-1] > top_p):
        values, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(values, dim=-1)
    # Keep a token while the tokens ranked above it hold no more than top_p; the first stays.
    keep = order[(cumulative - values) <= top_p]
    out = torch.full_like(logits, float("-inf"))
    out[keep] = logits[keep]
    return out


def sample_row(logits: torch.Tensor, state: SamplingState) -> int:
    """Draw one token from a 1-D float32 logits row according to ``state``.

    Gumbel-max: the argmax of the filtered, temperature-scaled logits plus Gumbel noise
    (-log(-log(u)), one uniform draw per vocabulary entry). Unlike inverting a cumulative sum
    over 50k entries, the winner only changes when two perturbed scores tie within rounding,
    so logits that differ by float noise (another batch shape, another replica) still give
    the same token.
    """
    if state.greedy:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits / state.temperature, state.top_k, state.top_p)
    u = torch.rand(logits.shape, generator=state.generator)
    gumbel = u.log_().neg_().log_().neg_().to(logits.device)
    return int(torch.argmax(scaled + gumbel))


def sample(
    logits: torch.Tensor, states: list[SamplingState], want_log_probs: list[bool]
) -> tuple[list[int], list[float | None]]:
    """Sample one token per row of ``logits`` [B, V]; return tokens and (optional) log-probs.

    Log-probs are those of the model's unmodified distribution (log-softmax of the raw logits),
    as Megatron reports them, whatever temperature or filtering chose the token.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} requests")
    logits = logits.float()
    tokens = [0] * len(states)
    greedy_rows = [i for i, s in enumerate(states) if s.greedy]
    if greedy_rows:
        # All-greedy batches (the common case) skip the row gather, a copy of B x vocab floats.
        rows = logits if len(greedy_rows) == len(states) else logits[greedy_rows]
        picked = torch.argmax(rows, dim=-1).tolist()
        for row, token in zip(greedy_rows, picked, strict=True):
            tokens[row] = token
    for i, state in enumerate(states):
        if not state.greedy:
            tokens[i] = sample_row(logits[i], state)
    log_probs: list[float | None] = [None] * len(states)
    rows = [i for i, want in enumerate(want_log_probs) if want]
    if rows:
        lp = torch.log_softmax(logits[rows], dim=-1)
        chosen = torch.tensor([tokens[i] for i in rows], device=lp.device)
        values = lp.gather(1, chosen[:, None])[:, 0].tolist()
        for row, value in zip(rows, values, strict=True):
            log_probs[row] = value
    return tokens, log_probs
