"""The training scenario of tests/test_model_training.py, and its torchrun worker.

``training_grads`` runs two losses through the training forward of one model and returns the
log-probs, the losses and every parameter's gradient under each: one through the
vocab-parallel ``token_log_probs`` (what RL uses), one through ``train_logits`` (the gathered
logits). Run as a script under torchrun, it loads each checkpoint at the launch's TP size and
saves this rank's results to ``<out>/<checkpoint name>.rank<R>.pt``.

Usage: torchrun --nproc-per-node T tests/_model_training_worker.py OUT_DIR TOKENS.pt CKPT_DIR...
"""

from __future__ import annotations

import os
import sys

import torch

from megatron_coord.models import training


def loss_weights(tokens: torch.Tensor) -> torch.Tensor:
    """Fixed per-token weights (signed, some zero: a mask and an advantage at once)."""
    generator = torch.Generator().manual_seed(7)
    weights = torch.randn(tokens.shape[0], tokens.shape[1] - 1, generator=generator)
    weights[:, :2] = 0.0
    return weights


def training_grads(model, tokens: torch.Tensor) -> dict:
    """Log-probs, both losses and their gradients, keyed by parameter name."""
    params = training.set_trainable(model, "all")
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict = {"grads": {}}
    log_probs = training.token_log_probs(model, tokens)
    loss = (log_probs * loss_weights(tokens)).sum()
    loss.backward()
    out["log_probs"] = log_probs.detach()
    out["tail_log_probs"] = training.token_log_probs(model, tokens, first=5).detach()
    mask = loss_weights(tokens)[:, 3:] > 0  # the output layer on a scattered subset
    out["masked_log_probs"] = training.token_log_probs(model, tokens, 4, mask).detach()
    out["loss"] = loss.item()
    out["grad_norm"] = training.grad_norm(model, params).item()
    out["grads"]["log_probs"] = {names[id(p)]: p.grad.clone() for p in params}
    for p in params:
        p.grad = None
    logits = training.train_logits(model, tokens)
    loss = (logits.sin() * logits.shape[-1] ** -0.5).sum()  # a gradient on every logit
    loss.backward()
    out["logits_loss"] = loss.item()
    out["grads"]["logits"] = {names[id(p)]: p.grad.clone() for p in params}
    return out


def main() -> None:
    import torch.distributed as dist

    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.parallel_state import initialize

    out_dir, tokens_path, *checkpoints = sys.argv[1:]
    torch.set_num_threads(1)  # two ranks share two cores
    state = initialize(int(os.environ["WORLD_SIZE"]))
    tokens = torch.load(tokens_path)
    for path in checkpoints:
        result = training_grads(load_model(path, state), tokens)
        name = os.path.basename(os.path.normpath(path))
        torch.save(result, os.path.join(out_dir, f"{name}.rank{state.rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
