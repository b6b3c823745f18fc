"""Rollouts inside an RL training loop: our ``TrainingInference.generate`` vs transformers'
``model.generate`` in the same processes, at equal batch and equal weights; and the cost of a
suspend/train/update/resume cycle against the step it serves.

    python benchmarks/rl_rollout.py [--quick] [--nproc 2]

Re-launches itself with torchrun (DP = --nproc replicas at TP 1, gloo, one torch thread a
rank), the shape of launch/train_grpo.py. Every rank times ``--repeats`` rollout batches three
ways twice, at the untrained weights (near-uniform over the 50257 tokens: the sampler's worst
case) and again after ``--steps`` steps of the GRPO loop (rl/loop.py; a peaked policy, as an
RL policy is), all ranks at once between two barriers, so a batch's wall time is the slowest
rank's:

- ours: each rank's share of a step (``prompts_per_step / nproc`` prompts x ``group_size``)
  through ``llm.generate``, log-probs returned, the coordinator spreading every rank's
  requests over every replica;
- transformers: the same prompts in the same process, ``LlamaForCausalLM.generate`` over the
  same weights (models/hf_export.py), left-padded, temperature 1 sampling without top-k/top-p
  (what TRL's GRPO trainer does without vLLM), serving suspended meanwhile;
- transformers with log-probs: the same plus one forward over the sequences for the sampled
  tokens' log-probs, as TRL computes them: what our ``generate`` returns at once.

tokens/s = every rank's generated tokens / the batch's wall time. Each of ``--repeats`` rounds
runs one batch of each way back to back, and a speedup is the median of the rounds' ratios,
so the shared host's shifting load falls on the three alike. The
loop's steps give each phase's seconds (rollout, suspend, train, update, resume; rank 0's,
median over the steps after the first): the cycle's cost against the step it serves.

Rank 0 prints JSON, writes benchmarks/results/rl_rollout.json and draws rl_rollout.png
(benchmarks/plot.py). ``--quick``: 2 loop steps, 1 repeat.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import RESULTS, write_results  # noqa: E402

PHASES = ("rollout_s", "suspend_s", "train_s", "update_s", "resume_s")


def _timed_batches(run: Any, repeats: int) -> list[dict[str, float]]:
    """``run()`` (this rank's generated-token count) ``repeats`` times, all ranks together:
    each batch's wall time (the slowest rank's) and every rank's tokens."""
    import torch
    import torch.distributed as dist

    out = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        tokens = run()
        dist.barrier()
        wall = time.perf_counter() - started
        total = torch.tensor([float(tokens)])
        dist.all_reduce(total)
        out.append(
            {"wall_s": wall, "tokens": int(total.item()), "tokens_per_s": total.item() / wall}
        )
    return out


def _summary(batches: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "median_tokens_per_s": statistics.median(b["tokens_per_s"] for b in batches),
        "best_tokens_per_s": max(b["tokens_per_s"] for b in batches),
        "batches": batches,
    }


def _hf_generate(
    hf: Any, prompts: list[list[int]], new_tokens: int, pad_id: int, log_probs: bool = False
) -> int:
    """One left-padded ``generate`` of ``prompts``; returns the tokens generated (up to and
    including each row's end-of-text). ``log_probs``: then one forward over the sequences for
    the generated tokens' log-probs, as TRL computes them (``logits_to_keep``, a log-softmax
    gathered at each token): what our ``generate`` returns along with the tokens."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            pad_token_id=pad_id,
        )
    generated = out[:, width:]
    if log_probs:
        full = torch.cat([mask, torch.ones_like(generated)], dim=1)
        with torch.inference_mode():
            logits = hf(input_ids=out, attention_mask=full, logits_to_keep=new_tokens + 1).logits
        logits = logits[:, :-1].float()
        picked = logits.gather(-1, generated[:, :, None])[..., 0] - logits.logsumexp(-1)
        assert picked.shape == generated.shape
    count = 0
    for row in generated.tolist():
        count += row.index(pad_id) + 1 if pad_id in row else len(row)
    return count


class _Rollouts:
    """Times one rollout batch (this rank's share of a step) three ways, at the weights the
    model holds when ``measure`` is called."""

    def __init__(self, llm: Any, model: Any, config: Any, batch: list[list[int]]) -> None:
        self.llm, self.model, self.config, self.batch = llm, model, config, batch

    def measure(self, repeats: int) -> dict[str, Any]:
        """``repeats`` rounds, each one batch of every way back to back (the host's load
        shifts: a round's three batches share it), ratios taken per round then medianed."""
        from transformers import LlamaForCausalLM

        from megatron_coord.models import default_checkpoint_dir
        from megatron_coord.models.hf_export import to_hf_model

        llm, batch, sampling = self.llm, self.batch, self.config.sampling_params()
        new_tokens, pad = self.config.max_new_tokens, self.model.config.eos_token_id
        hf = LlamaForCausalLM.from_pretrained(default_checkpoint_dir()).eval()
        hf = to_hf_model(self.model, hf)  # the weights the engine serves now
        ways: dict[str, Any] = {
            "ours": lambda: sum(len(r["generated_tokens"]) for r in llm.generate(batch, sampling)),
            "transformers": lambda: _hf_generate(hf, batch, new_tokens, pad),
            "transformers_with_log_probs": lambda: _hf_generate(hf, batch, new_tokens, pad, True),
        }
        version = llm.weight_version
        batches: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
        for round_ in range(repeats + 1):  # round 0 warms every way up, untimed
            for name, run in ways.items():
                if name == "ours":
                    llm.resume()
                timed = _timed_batches(run, 1)
                if name == "ours":
                    llm.suspend()  # serving parked while transformers runs in these processes
                if round_:
                    batches[name] += timed
        llm.resume()
        out: dict[str, Any] = {"weight_version": version}
        out.update({name: _summary(b) for name, b in batches.items()})
        for key, other in (
            ("speedup", "transformers"),
            ("speedup_vs_with_log_probs", "transformers_with_log_probs"),
        ):
            out[key] = statistics.median(
                a["tokens_per_s"] / b["tokens_per_s"]
                for a, b in zip(batches["ours"], batches[other], strict=True)
            )
        return out


def worker(args: argparse.Namespace) -> None:
    import random

    import torch
    import torch.distributed as dist

    from megatron_coord import TrainingInference, parallel_state  # type: ignore[attr-defined]
    from megatron_coord.rl import loop
    from megatron_coord.rl.config import LoopConfig, default_model_and_tokenizer
    from megatron_coord.rl.toy_task import NumeralsTask

    torch.set_num_threads(1)
    state = parallel_state.initialize(1)
    model, tokenizer = default_model_and_tokenizer(state)
    config = LoopConfig(steps=args.steps)
    task = NumeralsTask(tokenizer, model.config.vocab_size)
    prompts = loop.share(task.sample_prompts(config.prompts_per_step, random.Random(1)), state)
    batch = [task.prompt_tokens[p] for p in prompts for _ in range(config.group_size)]
    options = loop.serving_options(config, tokenizer)
    with TrainingInference(
        model, tokenizer, 1, weights_version=loop.version_name(0), **options
    ) as llm:
        rollouts = _Rollouts(llm, model, config, batch)
        # the untrained model: near-uniform over 50257 tokens, the sampler's worst case
        initial = rollouts.measure(args.repeats)
        log = loop.run(llm, model, tokenizer, state, config, progress=state.rank == 0)
        # the trained policy: peaked, as an RL policy is
        trained = rollouts.measure(args.repeats)
    if state.rank == 0:
        phases = {p: statistics.median(e[p] for e in log[1:] or log) for p in PHASES}
        cycle = phases["suspend_s"] + phases["train_s"] + phases["update_s"] + phases["resume_s"]
        out = {
            "benchmark": "rl_rollout",
            "config": {
                "replicas": state.world_size,
                "tensor_parallel_size": 1,
                "loop_steps": config.steps,
                "repeats": args.repeats,
                "prompts_per_step": config.prompts_per_step,
                "group_size": config.group_size,
                "max_new_tokens": config.max_new_tokens,
                "rows_per_rank": len(batch),
                "model": "embedded default model (4 layers, hidden 256, vocab 50257), float32",
            },
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                # the host is shared: its load says how far to trust the seconds
                "load_avg_1m_at_start": args.load_at_start,
                "load_avg_1m_at_end": os.getloadavg()[0],
            },
            "rollout": {"initial": initial, "trained": trained},
            "cycle": {
                "median_phase_s": phases,
                "suspend_train_update_resume_s": cycle,
                "overhead_s": phases["suspend_s"] + phases["update_s"] + phases["resume_s"],
                "rollout_s": phases["rollout_s"],
                "step_s": cycle + phases["rollout_s"],
            },
            "targets": [
                {
                    "target": f"{which} {key}",
                    "goal": ">= 2",
                    "value": result[key],
                    "met": result[key] >= 2,
                }
                for which, result in (("initial", initial), ("trained", trained))
                for key in ("speedup", "speedup_vs_with_log_probs")
            ],
            "loop": [
                {k: e[k] for k in ("step", "mean_reward", "weight_version", *PHASES)} for e in log
            ],
        }
        write_results(args.output, out)
        import plot

        for path in plot.plot_rl_rollout(os.path.dirname(args.output)):
            print(path, file=sys.stderr)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2, help="replicas (TP 1 each)")
    parser.add_argument("--steps", type=int, default=10, help="GRPO loop steps timed")
    parser.add_argument("--repeats", type=int, default=5, help="rollout batches timed each way")
    parser.add_argument("--quick", action="store_true", help="--steps 2 --repeats 1")
    parser.add_argument("--output", default=os.path.join(RESULTS, "rl_rollout.json"))
    parser.add_argument("--load-at-start", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 2, 1
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
        "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        os.path.abspath(__file__), "--steps", str(args.steps), "--repeats", str(args.repeats),
        "--output", os.path.abspath(args.output), "--load-at-start", str(os.getloadavg()[0]),
    ]  # fmt: skip
    sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))


if __name__ == "__main__":
    main()
