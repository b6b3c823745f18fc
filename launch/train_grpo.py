"""torchrun entry script: ``torchrun --nproc-per-node N launch/train_grpo.py --help``.

GRPO on the toy task (rl/toy_task.py) with rollouts through the coordinator: every rank trains
the model and serves it through ``megatron_coord.TrainingInference``. The loop is
``megatron_coord.rl.loop``; this file only reads the command line.
"""

import argparse
import sys

from megatron_coord.rl import config, loop

DEFAULT_STEPS = 15


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="GRPO on the toy task, rollouts through the coordinator (run by torchrun)"
    )
    # 15 steps: the reward passes 0.8 after 6 to 8 in one process (rl/config.py), 7 to 9 at
    # DP 2 (measured), so some to spare; the loop's 20 would spend the rest at 1.0.
    config.add_arguments(parser, config.LoopConfig(steps=DEFAULT_STEPS))
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--checkpoint", help="a Hugging Face Llama (default: the default model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--output-json",
        help='write the per-step log here: a list of {"step", "mean_reward", "weight_version", '
        '"rollout_s", "train_s", "update_s", ...}',
    )
    args = parser.parse_args(argv)
    try:
        loop_config = config.from_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    loop.train(
        loop_config,
        tensor_parallel_size=args.tensor_parallel_size,
        checkpoint=args.checkpoint,
        output_json=args.output_json,
        threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
