"""GRPO through the coordinator in a torchrun world: rollouts, a policy step, an update, repeated.

Every rank runs ``run`` (SPMD, as training scripts are written) over the model it trains and a
``TrainingInference`` built over that same model, so the engine serves the very parameters the
optimizer steps (no copy). Step k, its rollouts served by weights version ``step-k``:

1. **rollouts.** The step's prompts are drawn alike on every rank (one seed) and dealt out over
   the data-parallel ranks; on each replica its TP rank 0 submits its share, ``group_size``
   copies of each prompt, through ``llm.generate``, and the coordinator spreads every rank's
   requests over every replica. The replica's other TP ranks get the rollouts by a broadcast
   over the training TP group (they would otherwise submit the same prompts again). A group
   never straddles two replicas, so its advantages are computed where it lies.
2. **suspend.** ``llm.suspend()`` parks serving and frees its KV for the training step.
3. **train.** One GRPO policy step (rl/grpo.py ``train_on_rollouts``), gradients averaged over
   the data-parallel group, so every replica takes the same step and holds the same weights.
4. **update.** ``llm.update_weights(version="step-{k+1}")``: in place, the optimizer already
   wrote the parameters the engine reads.
5. **resume.** Serving comes back, under the new version, for step k + 1's rollouts.

The per-step log entry carries the mean reward over every rank's rollouts, the version that
served them (``weight_version``; ``served_versions``: what their ``weight_version_spans`` say,
which must be that one alone) and each phase's seconds on this rank.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .. import parallel_state
from ..models import training
from ..parallel_state import ParallelState
from .config import LoopConfig, default_model_and_tokenizer
from .grpo import Rollout, train_on_rollouts
from .toy_task import PROMPTS, NumeralsTask


def version_name(step: int) -> str:
    """The weights version that serves step ``step``'s rollouts (``step-0``: the initial)."""
    return f"step-{step}"


def data_parallel_group(state: ParallelState) -> Any:
    """This rank's data-parallel group: the ranks holding the same TP shard, one per replica.

    None with one replica (nothing to average). Every rank must call this at the same point,
    as ``new_group`` requires."""
    if state.data_parallel_size == 1:
        return None
    if state.tensor_parallel_size == 1:
        return dist.group.WORLD
    mine = None
    for tp_rank in range(state.tensor_parallel_size):
        ranks = list(range(tp_rank, state.world_size, state.tensor_parallel_size))
        group = dist.new_group(ranks)
        if tp_rank == state.tp_rank:
            mine = group
    return mine


def share(items: Sequence[int], state: ParallelState) -> list[int]:
    """This replica's share of a step's prompts: every DP-size-th one from its DP rank on."""
    return list(items[state.dp_rank :: state.data_parallel_size])


def served_versions(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every weights version the records' ``weight_version_spans`` name, sorted."""
    names = set()
    for record in records:
        for span in record.get("weight_version_spans") or ():
            names.add(str(span[-1]))
    return sorted(names)


def sample_rollouts(
    llm: Any,
    task: NumeralsTask,
    prompts: Sequence[int],
    config: LoopConfig,
    state: ParallelState,
) -> tuple[list[Rollout], list[str]]:
    """This replica's rollouts of ``prompts`` (indices into ``task.prompts``), scored, and the
    versions that served them. TP rank 0 generates; the others receive by broadcast."""
    payload: list[Any] = [None]
    if state.tp_rank == 0:
        batch = [task.prompt_tokens[p] for p in prompts for _ in range(config.group_size)]
        records = llm.generate(batch, config.sampling_params()) if batch else []
        if len(records) != len(batch):
            raise RuntimeError(f"generate returned {len(records)} records for {len(batch)}")
        rollouts = [
            Rollout.from_record(
                record,
                task.reward(record["generated_tokens"]),
                group=i // config.group_size,
                prompt_tokens=batch[i],
            )
            for i, record in enumerate(records)
        ]
        payload = [(rollouts, served_versions(records))]
    if state.tensor_parallel_size > 1:
        dist.broadcast_object_list(payload, src=state.tp_src_rank, group=state.tp_group)
    return payload[0]


def _summed(values: list[float], group: Any) -> list[float]:
    """``values`` summed over ``group`` (as they are without one)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor.tolist()


@contextlib.contextmanager
def _timed(times: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    times[name] = time.perf_counter() - started


class _Progress:
    """A progress bar on rank 0: tqdm when installed, else one line per step."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled, self.total, self.bar = enabled, total, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="step", desc="GRPO")

    def update(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        reward, version = f"{entry['mean_reward']:.3f}", entry["weight_version"]
        if self.bar is not None:
            self.bar.set_postfix(reward=reward, version=version)
            self.bar.update(1)
        else:
            print(
                f"step {entry['step'] + 1}/{self.total}: reward {reward} ({version})",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(
    llm: Any,
    model: Any,
    tokenizer: Any,
    state: ParallelState,
    config: LoopConfig,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` by GRPO on the toy task for ``config.steps`` steps, rollouts through
    ``llm`` (a ``TrainingInference`` over ``model``, built with weights version ``step-0``);
    every rank calls it. Returns the per-step log (the same mean rewards on every rank)."""
    if config.prompts_per_step < state.data_parallel_size:
        # a replica without prompts would have no rollouts to train on, while the others
        # wait for its gradients: refused on every rank alike, before anything starts
        raise ValueError(
            f"prompts_per_step ({config.prompts_per_step}) must be at least the number of "
            f"data-parallel replicas ({state.data_parallel_size})"
        )
    task = NumeralsTask(tokenizer, model.config.vocab_size)
    rng = random.Random(config.seed)  # the same draw of prompts on every rank
    torch.manual_seed(config.seed)
    params = training.set_trainable(model, config.trainable)
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99))
    dp_group = data_parallel_group(state)
    log: list[dict[str, Any]] = []
    bar = _Progress(config.steps, progress)
    try:
        for step in range(config.steps):
            times: dict[str, float] = {}
            served = llm.weight_version
            prompts = task.sample_prompts(config.prompts_per_step, rng)
            with _timed(times, "rollout_s"):
                rollouts, versions = sample_rollouts(
                    llm, task, share(prompts, state), config, state
                )
            rewards = sum(r.reward for r in rollouts)
            tokens = sum(len(r.generated_tokens) for r in rollouts)
            total_reward, count, total_tokens = _summed([rewards, len(rollouts), tokens], dp_group)
            with _timed(times, "suspend_s"):
                llm.suspend()
            with _timed(times, "train_s"):
                stats = train_on_rollouts(model, optimizer, params, rollouts, config.grpo, dp_group)
            with _timed(times, "update_s"):
                llm.update_weights(version=version_name(step + 1))
            with _timed(times, "resume_s"):
                llm.resume()
            entry: dict[str, Any] = {
                "step": step,
                "mean_reward": total_reward / max(count, 1.0),
                "weight_version": served,
                "served_versions": versions,
                **times,
                "rollouts": int(count),
                "rollout_tokens": int(total_tokens),
                "rollout_tokens_per_s": total_tokens / max(times["rollout_s"], 1e-9),
            }
            entry.update({k: v for k, v in stats.items() if k != "tokens"})
            if rollouts:
                entry["sample"] = tokenizer.detokenize(rollouts[0].generated_tokens)
            log.append(entry)
            bar.update(entry)
    finally:
        bar.close()
    return log


def write_log(path: str, log: list[dict[str, Any]]) -> None:
    """The per-step log as a JSON list (what ``--output-json`` writes)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(log, f, indent=1)
        f.write("\n")


def serving_options(config: LoopConfig, tokenizer: Any) -> dict[str, int]:
    """``TrainingInference`` sizes for ``config``'s steps: any one replica may get every
    rollout of a step, and KV for just those, not for the model's whole context (suspend
    frees it and resume builds it again, every step)."""
    rows = config.prompts_per_step * config.group_size
    longest = max(len(tokenizer.tokenize(p)) for p in PROMPTS) + config.max_new_tokens
    return {"max_batch_size": rows, "max_seq_len": longest, "kv_cache_tokens": rows * longest}


def train(
    config: LoopConfig,
    tensor_parallel_size: int = 1,
    checkpoint: str | None = None,
    output_json: str | None = None,
    threads: int = 1,
    **options: Any,
) -> list[dict[str, Any]]:
    """The program of launch/train_grpo.py on one rank of a torchrun world: initialize the
    world (DP = world / TP), load the model, build the ``TrainingInference`` over it
    (``options`` go to it), ``run``, and on rank 0 print the reward curve and the wall time
    and write ``output_json``. Returns the log."""
    from ..training_inference import TrainingInference

    torch.set_num_threads(threads)
    started = time.perf_counter()
    state = parallel_state.initialize(tensor_parallel_size)
    model, tokenizer = default_model_and_tokenizer(state, checkpoint)
    for name, value in serving_options(config, tokenizer).items():
        options.setdefault(name, value)
    with TrainingInference(
        model, tokenizer, tensor_parallel_size, weights_version=version_name(0), **options
    ) as llm:
        log = run(llm, model, tokenizer, state, config, progress=state.rank == 0)
    wall = time.perf_counter() - started
    if state.rank == 0:
        rewards = " ".join(f"{entry['mean_reward']:.2f}" for entry in log)
        print(f"rewards: {rewards}\nwall: {wall:.1f} s", flush=True)
        if output_json:
            write_log(output_json, log)
    return log
