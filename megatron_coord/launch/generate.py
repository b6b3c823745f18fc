r"""Generate completions for prompts with N data-parallel replicas of T tensor-parallel ranks.

    torchrun --nproc-per-node N launch/generate.py [--model DIR] --tensor-parallel-size T \
        --prompt TEXT [--prompt TEXT ...] [--prompts-file F] --num-tokens-to-generate K \
        [--top-k 1] [--temperature X] [--top-p P] [--seed S] [--deterministic-mode] \
        [--return-log-probs] [--output-json PATH]

Global rank 0 spawns the coordinator and a client; every rank serves as part of an engine. The
completions are printed (with a progress bar for many prompts) and written, in prompt order, to
--output-json as a list of {prompt, prompt_tokens, generated_text, generated_tokens,
data_parallel_rank, finish_reason} ({prompt, error} for a prompt that could not be served; the
exit status is then 4).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..exit_codes import GENERATE_HELP_EPILOG, OK, REQUESTS_FAILED, ConfigurationError, run_main
from ..sampling_params import SamplingParams
from .arguments import add_replica_arguments, options_from_args
from .generate_job import read_prompts, run_generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=GENERATE_HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_replica_arguments(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts-file", help="a file of prompts: a JSON list of strings, or one per line"
    )
    parser.add_argument("--num-tokens-to-generate", type=int, default=30, help="default 30")
    parser.add_argument(
        "--top-k",
        type=int,
        default=1,
        help="sample among the k likeliest tokens; 1 = greedy (default), 0 = no top-k filter",
    )
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus mass; 0 = off")
    parser.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed for every prompt")
    parser.add_argument(
        "--termination-id", type=int, default=None, help="stop token (default: the EOS id)"
    )
    parser.add_argument(
        "--return-log-probs", action="store_true", help="include generated tokens' log-probs"
    )
    parser.add_argument("--output-json", help="write the completions here (a JSON list)")
    parser.add_argument("--quiet", action="store_true", help="do not print the completions")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: see megatron_coord.exit_codes (each in --help)."""
    args = parse_args(argv)
    return run_main(lambda: _generate(args))


def _generate(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from None
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_tokens_to_generate=args.num_tokens_to_generate,
        termination_id=args.termination_id,
        return_log_probs=args.return_log_probs,
        seed=args.seed,
    )
    completions = run_generate(options_from_args(args), prompts, params, progress=len(prompts) >= 8)
    if completions is None:  # not global rank 0
        return OK
    for i, c in enumerate(completions):
        if "error" in c:
            short = c["prompt"] if len(c["prompt"]) <= 60 else c["prompt"][:57] + "..."
            print(f"[{i}] {short!r} failed: {c['error']}", file=sys.stderr)
        elif not args.quiet:
            dp, text = c["data_parallel_rank"], c["generated_text"]
            print(f"[{i}] (dp {dp}) {c['prompt']!r} -> {text!r}")
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(completions, f, indent=1)
    return REQUESTS_FAILED if any("error" in c for c in completions) else OK


if __name__ == "__main__":
    sys.exit(main())
