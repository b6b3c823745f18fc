"""A GRPO loop in one process: rollouts from an in-process engine, a policy step, repeated.

It proves and tunes the learning dynamics of rl/grpo.py on the toy task (rl/toy_task.py)
before the rollouts go through the coordinator (rl/loop.py, launch/train_grpo.py): the engine
serves the very parameters the optimizer updates (no copy), as ``TrainingInference`` does.
The engine's prefix cache is off: KV blocks computed under last step's weights must not be
reused under this step's (the coordinator's path names blocks by weight version instead).

``python -m megatron_coord.rl.prototype --seed 0 --output-json curve.json`` runs it on the
default model and writes the per-step log.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict
from typing import Any

import torch

from ..engine.engine import InferenceEngine
from ..engine.tp_broadcast import NewRequest
from ..models import training
from ..parallel_state import single_process_state
from ..sampling_params import SamplingParams
from .config import LoopConfig, add_arguments, default_model_and_tokenizer, from_arguments
from .grpo import Rollout, train_on_rollouts
from .toy_task import NumeralsTask

# The loop's hyperparameters (rl/config.py), under the name this module gave them first.
PrototypeConfig = LoopConfig


def generate_rollouts(
    engine: InferenceEngine,
    task: NumeralsTask,
    prompts: list[int],
    group_size: int,
    params: SamplingParams,
    rng: random.Random,
    first_id: int = 0,
) -> list[Rollout]:
    """``group_size`` completions of each prompt (by index into ``task.prompts``), scored."""
    owners = {}
    for group, prompt in enumerate(prompts):
        for _ in range(group_size):
            request_id = first_id + len(owners)
            owners[request_id] = group
            tokens = task.prompt_tokens[prompt]
            engine.add_request(NewRequest(request_id, tokens, params, rng.getrandbits(63)))
    rollouts: dict[int, Rollout] = {}
    while engine.has_work:
        for record in engine.step().finished:
            request = record["requests"][0]
            reward = task.reward(request["generated_tokens"])
            rollout = Rollout.from_record(record, reward, owners[request["request_id"]])
            rollouts[request["request_id"]] = rollout
    return [rollouts[i] for i in sorted(rollouts)]


def run(
    config: LoopConfig,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` (default: the embedded default model) for ``config.steps`` steps and
    return the per-step log (reward before the step's update, timings, loss statistics)."""
    from tqdm import tqdm

    if model is None:
        model, tokenizer = default_model_and_tokenizer(single_process_state())
    task = NumeralsTask(tokenizer, model.config.vocab_size)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    params = training.set_trainable(model, config.trainable)
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99))
    rows = config.prompts_per_step * config.group_size
    longest = max(len(t) for t in task.prompt_tokens) + config.max_new_tokens
    engine = InferenceEngine(model, max_batch_size=rows, max_seq_len=longest, prefix_caching=False)
    sampling = config.sampling_params()
    log = []
    bar = tqdm(range(config.steps), disable=not progress, unit="step")
    for step in bar:
        started = time.perf_counter()
        prompts = task.sample_prompts(config.prompts_per_step, rng)
        rollouts = generate_rollouts(
            engine, task, prompts, config.group_size, sampling, rng, step * rows
        )
        rollout_s = time.perf_counter() - started
        mean_reward = sum(r.reward for r in rollouts) / len(rollouts)
        started = time.perf_counter()
        stats = train_on_rollouts(model, optimizer, params, rollouts, config.grpo)
        train_s = time.perf_counter() - started
        entry = {"step": step, "mean_reward": mean_reward, "rollout_s": rollout_s}
        entry.update(train_s=train_s, **stats)
        entry["sample"] = tokenizer.detokenize(rollouts[0].generated_tokens)
        log.append(entry)
        bar.set_postfix(reward=f"{entry['mean_reward']:.3f}")
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output-json", help="write the per-step log here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = from_arguments(args)
    started = time.perf_counter()
    log = run(config, progress=True)
    wall = time.perf_counter() - started
    rewards = " ".join(f"{e['mean_reward']:.2f}" for e in log)
    print(f"rewards: {rewards}\nwall: {wall:.1f} s")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump({"config": asdict(config), "wall_s": wall, "log": log}, f, indent=1)


if __name__ == "__main__":
    main()
