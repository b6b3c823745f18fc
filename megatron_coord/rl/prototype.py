"""A GRPO loop in one process: rollouts from an in-process engine, a policy step, repeated.

It proves and tunes the learning dynamics of rl/grpo.py on the toy task (rl/toy_task.py)
before the rollouts go through the coordinator (launch/train_grpo.py): the engine serves the
very parameters the optimizer updates (no copy), as the in-process serving class will.
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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..engine.engine import InferenceEngine
from ..engine.tp_broadcast import NewRequest
from ..models import training
from ..sampling_params import SamplingParams
from .grpo import GRPOConfig, Rollout, group_advantages, pack_rollouts, policy_step
from .toy_task import NumeralsTask


@dataclass
class PrototypeConfig:
    """The loop's hyperparameters; the defaults are tuned for the default model on the toy task.

    Measured on 2 shared CPU cores, one torch thread, seeds 0-4: the mean reward goes from
    about 0.03 to at least 0.8 after 6 to 8 policy steps (about 3 s each: 0.9 s of rollouts,
    2 s of training, nearly all of it the output layer's 50257 columns) and stays at 1.0 once
    there (the policy settles on one numeral); ``steps`` leaves more than twice that margin:
    60-75 s for the 20 steps. All weights train: the output layer alone (tied to the
    embedding) is slower and less steady (at 1e-2 it reaches 0.23 in 15 steps where all
    weights reach 1.0 in 10; at 3e-2 it wavers between 0.8 and 0.9), since without the
    layers below it cannot make the last hidden state alike across contexts. Adam at 2e-2
    is high for a real model and right for this random one, whose logits must move by about
    5 nats; 1e-2 takes about twice the steps, 3e-3 does not move in 15. Eight prompts of
    eight rollouts (64 sequences) make one batch and one optimizer step: four prompts take
    cheaper but noisier steps, more of them, for about the same wall time.
    """

    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    lr: float = 2e-2
    trainable: str = "all"
    seed: int = 0
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            num_tokens_to_generate=self.max_new_tokens,
            return_log_probs=True,
            skip_prompt_log_probs=True,
        )


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
    config: PrototypeConfig,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` (default: the embedded default model) for ``config.steps`` steps and
    return the per-step log (reward before the step's update, timings, loss statistics)."""
    from tqdm import tqdm

    if model is None:
        model, tokenizer = _default_model_and_tokenizer()
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
        rewards = torch.tensor([r.reward for r in rollouts])
        groups = torch.tensor([r.group for r in rollouts])
        advantages = group_advantages(rewards, groups, config.grpo.scale_by_std)
        started = time.perf_counter()
        stats = policy_step(
            model, optimizer, params, pack_rollouts(rollouts, advantages), config.grpo
        )
        train_s = time.perf_counter() - started
        entry = {"step": step, "mean_reward": rewards.mean().item(), "rollout_s": rollout_s}
        entry.update(train_s=train_s, **stats)
        entry["sample"] = tokenizer.detokenize(rollouts[0].generated_tokens)
        log.append(entry)
        bar.set_postfix(reward=f"{entry['mean_reward']:.3f}")
    return log


def _default_model_and_tokenizer() -> tuple[Any, Any]:
    from ..models import default_checkpoint_dir, load_model
    from ..parallel_state import single_process_state
    from ..tokenizer import load_tokenizer

    path = default_checkpoint_dir()
    return load_model(path, single_process_state()), load_tokenizer(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = PrototypeConfig()
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "seed"):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name)
        )
    for name in ("temperature", "lr"):
        parser.add_argument("--" + name, type=float, default=getattr(defaults, name))
    parser.add_argument("--trainable", choices=training.TRAINABLE, default=defaults.trainable)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output-json", help="write the per-step log here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = {k: v for k, v in vars(args).items() if k not in ("threads", "output_json")}
    config = PrototypeConfig(**fields)
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
