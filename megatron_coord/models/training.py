"""Training the tensor-parallel Llama: a forward without KV cache that carries gradients.

The serving forward (``LlamaModel.forward``) runs under ``torch.inference_mode`` over a paged
KV cache. Training needs the same model over whole sequences with autograd, so this module
runs the same layers through their cache-free ``causal`` path; the TP collectives switch to
their autograd forms whenever their input requires grad (``tp_collectives.py``), so a rank's
gradients are its shard of the unsplit model's gradients, at any TP size. The weights are the
serving model's own: an optimizer step on them changes what the engine serves, with no copy.

Batches are right-padded: each row starts at position 0 and its padding comes after its last
real token, so causal attention never lets a real token see padding; the caller masks out
the padded positions' outputs (see ``rl/grpo.py``).

Everything here is SPMD over the TP group: every rank calls it with the same tokens and gets
the same (replicated) log-probs and loss, and runs backward on its own copy of the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .llama import LlamaModel

TRAINABLE = ("all", "output")


def set_trainable(model: LlamaModel, which: str = "all") -> list[torch.nn.Parameter]:
    """Make ``which`` parameters require grad (the others frozen) and return them.

    ``"all"``: every weight. ``"output"``: the output layer only (with tied embeddings, as in
    the default model, that one matrix is the embedding too). Parameters are listed once even
    when tied, in a fixed order, the same on every rank of a TP group.
    """
    if which not in TRAINABLE:
        raise ValueError(f"which must be one of {TRAINABLE}, got {which!r}")
    chosen = []
    for param in model.parameters():  # tied weights appear once
        train = which == "all" or param is model.lm_head
        param.requires_grad_(train)
        if train:
            chosen.append(param)
    return chosen


def causal_hidden(model: LlamaModel, tokens: torch.Tensor) -> torch.Tensor:
    """The final-norm hidden states [B, S, hidden] of right-padded ``tokens`` [B, S]."""
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be a non-empty [B, S] tensor, got {tuple(tokens.shape)}")
    s = tokens.shape[1]
    if s > model.config.max_position_embeddings:
        raise ValueError(
            f"{s} positions exceed max_position_embeddings {model.config.max_position_embeddings}"
        )
    model._ensure_rope(s)
    cos, sin = model._cos[:s], model._sin[:s]
    if cos.is_inference():  # tables grown inside a serving step cannot be saved for backward
        cos, sin = cos.clone(), sin.clone()
    cos, sin = cos[None, :, None], sin[None, :, None]  # [1, S, 1, head_dim]
    x = model._embed(tokens.to(model.device))
    for layer in model.layers:
        x = layer.causal(x, cos, sin)
    return model.norm(x)


def train_logits(model: LlamaModel, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, S, vocab] of every position, identical on every TP rank.

    Gathers the whole vocabulary; ``token_log_probs`` does not, and is what a policy loss
    needs."""
    hidden = causal_hidden(model, tokens)
    return model._output(model.tp.copy_in(hidden))


def token_log_probs(
    model: LlamaModel, tokens: torch.Tensor, first: int = 1, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(tokens[:, t] | tokens[:, :t]) for t in [first, S): float32 [B, S - first].

    The output layer runs only on the positions that predict those tokens (a completion after
    a prompt of ``first`` tokens needs only its own), or, given ``mask`` [B, S - first] bool,
    only where it is set (the rest read 0: padding and prompts cost no output layer). The
    log-softmax is vocab-parallel: each rank works on its slice of the logits and three
    scalars per position cross the TP group (max, sum of exponentials, the target's logit),
    never the full vocabulary. These are the log-probs the engine reports for sampled tokens
    (of the unmodified distribution, whatever temperature drew them).
    """
    s = tokens.shape[1] if tokens.dim() == 2 else 0
    if not 1 <= first < s:
        raise ValueError(f"first must lie in [1, {s}) for {s} positions, got {first}")
    tokens = tokens.to(model.device)
    hidden = causal_hidden(model, tokens)[:, first - 1 : -1]
    targets = tokens[:, first:]
    if mask is None:
        local = F.linear(model.tp.copy_in(hidden), model.lm_head).float()
        return vocab_parallel_log_probs(model, local, targets)
    mask = mask.to(model.device)
    if mask.shape != targets.shape:
        raise ValueError(f"mask must have shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    local = F.linear(model.tp.copy_in(hidden[mask]), model.lm_head).float()
    out = torch.zeros(targets.shape, device=model.device)
    out[mask] = vocab_parallel_log_probs(model, local, targets[mask])
    return out


def vocab_parallel_log_probs(
    model: LlamaModel, local_logits: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """log-softmax at ``targets`` of logits split over the TP group's vocabulary slices.

    ``local_logits`` [..., vocab_part] is this rank's slice (padding columns past the real
    vocabulary included); ``targets`` [...] are global token ids."""
    lay, tp = model.layout, model.tp
    if lay.tp == 1:
        log_probs = torch.log_softmax(local_logits, dim=-1)
        return log_probs.gather(-1, targets[..., None])[..., 0]
    real = model.config.vocab_size - lay.vocab_start  # local columns that are real tokens
    if real < lay.vocab_part:
        pad = torch.arange(lay.vocab_part, device=local_logits.device) >= real
        local_logits = local_logits.masked_fill(pad, float("-inf"))
    shift = tp.all_reduce_max(local_logits.max(dim=-1).values)
    shifted = local_logits - shift[..., None]
    total = tp.all_reduce(shifted.exp().sum(dim=-1))
    local_targets = targets - lay.vocab_start
    outside = (local_targets < 0) | (local_targets >= lay.vocab_part)
    picked = shifted.gather(-1, local_targets.clamp(0, lay.vocab_part - 1)[..., None])[..., 0]
    picked = tp.all_reduce(picked.masked_fill(outside, 0.0))
    return picked - total.log()


def grad_norm(model: LlamaModel, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of the gradients of ``params`` over the whole (unsplit) model.

    Matrices are TP shards, so their squared norms are summed over the group; vectors (the
    norms' weights) are replicated and count once. The same on every rank."""
    zero = torch.zeros((), device=model.device, dtype=torch.float32)
    sharded, replicated = zero.clone(), zero.clone()
    for p in params:
        if p.grad is not None:
            square = p.grad.detach().float().pow(2).sum()
            if p.dim() >= 2:
                sharded += square
            else:
                replicated += square
    return (model.tp.all_reduce(sharded) + replicated).sqrt()


def clip_grad_norm(
    model: LlamaModel, params: list[torch.nn.Parameter], max_norm: float
) -> torch.Tensor:
    """Scale the gradients so their model-wide norm is at most ``max_norm``; return the norm
    before clipping (every rank scales by the same factor)."""
    norm = grad_norm(model, params)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.detach().mul_(scale.to(p.grad.dtype))
    return norm
