"""The training scenario of tests/test_model_training.py, and its torchrun worker.

``training_grads`` runs two losses through the training forward of one model and returns the
log-probs, the losses and every parameter's gradient under each: one through the
vocab-parallel ``token_log_probs`` (what RL uses), one through ``train_logits`` (the gathered
logits). Run as a script under torchrun, it loads each checkpoint at the launch's TP size and
saves this rank's results to ``<out>/<checkpoint name>.rank<R>.pt``; then, every rank a TP=1
replica of the first checkpoint, it takes one GRPO step on its half of ``grpo_rollouts`` with
gradients averaged over the world, and saves the weights to ``<out>/dp.rank<R>.pt``.

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


def grpo_rollouts(model, count: int = 4):
    """``count`` rollouts of one 3-token prompt, 4 tokens each, with the model's log-probs."""
    from megatron_coord.rl.grpo import Rollout

    generator = torch.Generator().manual_seed(11)
    completions = torch.randint(0, model.config.vocab_size, (count, 4), generator=generator)
    tokens = torch.cat([torch.tensor([[1, 2, 3]]).expand(count, 3), completions], dim=1)
    with torch.no_grad():
        log_probs = training.token_log_probs(model, tokens, 3)
    return [
        Rollout([1, 2, 3], completions[i].tolist(), log_probs[i].tolist(), float(i % 3), 0)
        for i in range(count)
    ]


def grpo_step(model, rows: slice, dp_group=None) -> dict[str, torch.Tensor]:
    """The weights after one GRPO step (SGD) on ``rows`` of ``grpo_rollouts``; advantages
    are the whole group's, as a caller computes them before sharing rows out. SGD, not Adam:
    the step is then linear in the averaged gradient, so float noise in the all-reduce stays
    noise (Adam's first step is about lr * sign(g), and flips where a gradient is ~0)."""
    from megatron_coord.rl.grpo import GRPOConfig, group_advantages, pack_rollouts, policy_step

    rollouts = grpo_rollouts(model)
    rewards = torch.tensor([r.reward for r in rollouts])
    advantages = group_advantages(rewards, torch.zeros(len(rollouts)))
    params = training.set_trainable(model, "all")
    optimizer = torch.optim.SGD(params, lr=0.1)
    batch = pack_rollouts(rollouts[rows], advantages[rows])
    policy_step(model, optimizer, params, batch, GRPOConfig(max_grad_norm=0.5), dp_group)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def main() -> None:
    import torch.distributed as dist

    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.parallel_state import initialize, single_process_state

    out_dir, tokens_path, *checkpoints = sys.argv[1:]
    torch.set_num_threads(1)  # two ranks share two cores
    state = initialize(int(os.environ["WORLD_SIZE"]))
    tokens = torch.load(tokens_path)
    for path in checkpoints:
        result = training_grads(load_model(path, state), tokens)
        name = os.path.basename(os.path.normpath(path))
        torch.save(result, os.path.join(out_dir, f"{name}.rank{state.rank}.pt"))
    # Data parallel: each rank a TP=1 replica with half the rollouts, gradients averaged.
    replica = load_model(checkpoints[0], single_process_state())
    half = slice(2 * state.rank, 2 * state.rank + 2)
    weights = grpo_step(replica, half, dist.group.WORLD)
    torch.save(weights, os.path.join(out_dir, f"dp.rank{state.rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
