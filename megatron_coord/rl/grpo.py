"""GRPO's learning core: group-relative advantages, the clipped policy loss, one policy step.

GRPO (DeepSeekMath, 2024) samples a *group* of completions per prompt, scores each with a
reward, and takes a completion's advantage relative to its group: ``(r - mean) / std`` over
the group (or ``r - mean`` alone, Dr. GRPO's variant), so no value model is needed. The loss is
PPO's clipped surrogate per generated token, with the ratio taken against the log-probs the
sampler reported, plus optionally ``kl_coef`` times the k3 estimate of KL to a reference
policy. With one optimizer step per batch of rollouts the ratio is 1 up to the
train/inference mismatch (which ``policy_step`` reports); the clip acts once a batch is
reused for several steps.

Nothing here knows where rollouts come from: the engine in-process (rl/prototype.py), or
the coordinator (``generated_tokens`` and ``generated_log_probs`` of its records). Those
log-probs are of the model's unmodified distribution whatever temperature or filter drew the
token, and so are ``token_log_probs``: sample at temperature 1 without top-k/top-p for the
ratio to be the importance weight of the distribution that sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..models import training
from ..models.llama import LlamaModel

AGGREGATIONS = ("token", "sequence")


@dataclass
class Rollout:
    """One sampled completion: its prompt, tokens, the sampler's log-probs and its reward.

    ``group`` names the prompt it was sampled for: advantages compare rollouts of a group."""

    prompt_tokens: list[int]
    generated_tokens: list[int]
    log_probs: list[float]
    reward: float
    group: int

    @classmethod
    def from_record(
        cls,
        record: dict[str, Any],
        reward: float,
        group: int,
        prompt_tokens: Sequence[int] | None = None,
    ) -> Rollout:
        """From an engine's or the coordinator's finished record (``return_log_probs``);
        ``prompt_tokens`` for a record that does not carry its prompt's tokens."""
        request = record["requests"][0] if "requests" in record else record
        log_probs = request.get("generated_log_probs")
        if log_probs is None:
            raise ValueError("the record has no generated_log_probs: sample with return_log_probs")
        if prompt_tokens is None:
            prompt_tokens = request["prompt_tokens"]
        return cls(
            list(prompt_tokens),
            list(request["generated_tokens"]),
            list(log_probs),
            float(reward),
            group,
        )


@dataclass
class GRPOConfig:
    """The knobs of one policy step (defaults: GRPO as in TRL, one step per batch)."""

    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO's "higher")
    clip_high: float = 0.2
    kl_coef: float = 0.0  # > 0 needs reference log-probs
    scale_by_std: bool = True  # False: Dr. GRPO's unscaled advantages
    aggregation: str = "token"  # "token": mean over all tokens; "sequence": per row, then mean
    max_grad_norm: float | None = 1.0
    micro_batch_size: int = 16  # rows per forward/backward (gradients accumulate)

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Each reward minus its group's mean, divided by the group's std (unbiased, as TRL's).

    A group whose rewards are all equal (up to rounding) teaches nothing: its advantages are
    0, a group of one's too."""
    rewards = rewards.double()
    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, index, rewards)
    mean = (sums / counts)[index]
    centered = rewards - mean
    if scale_by_std:
        squares = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, index, centered**2)
        std = (squares / (counts - 1).clamp(min=1)).sqrt()[index]
        centered = torch.where(std > 1e-9, centered / (std + eps), 0.0)
    return centered.float()


@dataclass
class RolloutBatch:
    """Rollouts as right-padded tensors, ready for ``token_log_probs(model, tokens, first)``.

    Columns of the [N, S - first] tensors stand for positions ``first..S-1`` of ``tokens``;
    ``mask`` marks the generated ones."""

    tokens: torch.Tensor  # [N, S] prompt, completion, padding
    first: int  # the shortest prompt's length
    mask: torch.Tensor  # [N, S - first] bool
    old_log_probs: torch.Tensor  # [N, S - first] the sampler's (0 where masked)
    advantages: torch.Tensor  # [N]
    ref_log_probs: torch.Tensor | None = None  # [N, S - first], for the KL term

    def rows(self, lo: int, hi: int) -> RolloutBatch:
        ref = None if self.ref_log_probs is None else self.ref_log_probs[lo:hi]
        return RolloutBatch(
            self.tokens[lo:hi],
            self.first,
            self.mask[lo:hi],
            self.old_log_probs[lo:hi],
            self.advantages[lo:hi],
            ref,
        )


def pack_rollouts(
    rollouts: Sequence[Rollout], advantages: torch.Tensor, pad_id: int = 0
) -> RolloutBatch:
    """Lay rollouts out as one right-padded batch (rows with no generated token are dropped
    by the mask, not the layout)."""
    if not rollouts:
        raise ValueError("no rollouts")
    for r in rollouts:
        if len(r.log_probs) != len(r.generated_tokens):
            raise ValueError("a rollout has a log-prob per generated token")
    lengths = [len(r.prompt_tokens) + len(r.generated_tokens) for r in rollouts]
    first = min(len(r.prompt_tokens) for r in rollouts)
    width = max(max(lengths), first + 1)
    tokens = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rollouts), width - first, dtype=torch.bool)
    old = torch.zeros(len(rollouts), width - first)
    for row, r in enumerate(rollouts):
        sequence = r.prompt_tokens + r.generated_tokens
        tokens[row, : len(sequence)] = torch.tensor(sequence)
        lo = len(r.prompt_tokens) - first
        hi = lo + len(r.generated_tokens)
        mask[row, lo:hi] = True
        old[row, lo:hi] = torch.tensor(r.log_probs)
    return RolloutBatch(tokens, first, mask, old, advantages.float())


def policy_loss(
    log_probs: torch.Tensor,
    batch: RolloutBatch,
    config: GRPOConfig,
    total_tokens: float,
    total_rows: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (+ KL) of ``batch``'s rows, normalized over the whole batch.

    ``total_tokens`` / ``total_rows`` are the whole batch's (generated tokens, rows), so that
    micro-batch losses add up to the batch's loss. Returns the loss and detached sums (of
    clipped tokens, the KL, the ratio) for statistics."""
    mask = batch.mask.to(log_probs.dtype)
    ratio = torch.exp(log_probs - batch.old_log_probs)
    advantages = batch.advantages[:, None]
    clipped = ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(per_token)
    if config.kl_coef > 0:
        if batch.ref_log_probs is None:
            raise ValueError("kl_coef > 0 needs the batch's ref_log_probs")
        delta = batch.ref_log_probs - log_probs
        kl = torch.exp(delta) - delta - 1.0  # k3: unbiased, always >= 0
        per_token = per_token + config.kl_coef * kl
    if config.aggregation == "token":
        loss = (per_token * mask).sum() / max(total_tokens, 1.0)
    else:
        per_row = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        loss = per_row.sum() / total_rows
    with torch.no_grad():
        stats = {
            "clipped": ((ratio - clipped).abs() > 0).to(mask.dtype).mul(mask).sum(),
            "kl": (kl * mask).sum(),
            "ratio": (ratio * mask).sum(),
            "mismatch": ((log_probs - batch.old_log_probs).abs() * mask).max(),
        }
    return loss, stats


def policy_step(
    model: LlamaModel,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batch: RolloutBatch,
    config: GRPOConfig,
    dp_group: Any = None,
) -> dict[str, float]:
    """One optimizer step of GRPO over ``batch`` (micro-batched, gradients accumulated).

    SPMD over the TP group: every rank passes the same batch. With ``dp_group`` (several
    data-parallel replicas, each with its own rows), gradients are averaged over it before
    clipping, so every replica takes the same step. Returns the step's statistics, among
    them ``mismatch``: the largest |training - sampler| log-prob of a generated token (the
    train/inference mismatch) before the step.
    """
    optimizer.zero_grad(set_to_none=True)
    total_tokens = float(batch.mask.sum())
    total_rows = len(batch.tokens)
    sums = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "ratio": 0.0}
    mismatch = 0.0
    for lo in range(0, total_rows, config.micro_batch_size):
        part = batch.rows(lo, lo + config.micro_batch_size)
        log_probs = training.token_log_probs(model, part.tokens, part.first, part.mask)
        loss, stats = policy_loss(log_probs, part, config, total_tokens, total_rows)
        loss.backward()
        sums["loss"] += loss.item()
        for key in ("clipped", "kl", "ratio"):
            sums[key] += stats[key].item()
        mismatch = max(mismatch, stats["mismatch"].item())
    if dp_group is not None:
        _average_gradients(params, dp_group)
    norm = math.nan
    if config.max_grad_norm is not None:
        norm = training.clip_grad_norm(model, params, config.max_grad_norm).item()
    optimizer.step()
    tokens = max(total_tokens, 1.0)
    return {
        "loss": sums["loss"],
        "grad_norm": norm,
        "clip_fraction": sums["clipped"] / tokens,
        "kl": sums["kl"] / tokens,
        "mean_ratio": sums["ratio"] / tokens,
        "mismatch": mismatch,
        "tokens": total_tokens,
    }


def train_on_rollouts(
    model: LlamaModel,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    rollouts: Sequence[Rollout],
    config: GRPOConfig,
    dp_group: Any = None,
) -> dict[str, float]:
    """Group advantages, the padded batch, one ``policy_step``: what every loop does with a
    step's rollouts (the in-process prototype and the loop through the coordinator alike).

    Each group must lie wholly in ``rollouts`` (with ``dp_group``, on one replica), since
    advantages compare a rollout with its own group only."""
    rewards = torch.tensor([r.reward for r in rollouts])
    groups = torch.tensor([r.group for r in rollouts])
    advantages = group_advantages(rewards, groups, config.scale_by_std)
    batch = pack_rollouts(rollouts, advantages)
    return policy_step(model, optimizer, params, batch, config, dp_group)


def _average_gradients(params: list[torch.nn.Parameter], group: Any) -> None:
    """Average the gradients over a data-parallel group (a parameter without one sends 0)."""
    size = dist.get_world_size(group)
    for p in params:
        grad = torch.zeros_like(p) if p.grad is None else p.grad.contiguous()
        dist.all_reduce(grad, group=group)
        p.grad = grad.div_(size)


@torch.no_grad()
def reference_log_probs(reference: LlamaModel, batch: RolloutBatch) -> torch.Tensor:
    """The reference policy's log-probs of ``batch`` (for ``kl_coef``), 0 where masked."""
    parts = [
        training.token_log_probs(reference, part.tokens, part.first, part.mask)
        for part in (batch.rows(lo, lo + 16) for lo in range(0, len(batch.tokens), 16))
    ]
    return torch.cat(parts)
