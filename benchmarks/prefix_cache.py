"""Prefill time saved by the engine's prefix cache, and the decode step's cost, in process.

    python benchmarks/prefix_cache.py [--prefix-len 512] [--suffix-len 32] [--requests 8]
        [--repeat 5] [--threads 2] [--model DIR] [--decode-context 32,512]

On the embedded default model (default_checkpoint_dir) unless --model is given:

* prefill: requests that share a ``--prefix-len``-token prefix and differ in a
  ``--suffix-len``-token suffix, each alone in the engine with a one-token budget (the step
  that admits it prefills it and finishes it): the wall time of that step, cache on vs off,
  alternating request by request so load from other processes hits both alike. The first
  request of the cache-on side computes the prefix (a miss); the others reuse it.
* batch: the same requests submitted together (one prefill step for all), after one request
  warmed the cache.
* decode: the mean step time of ``--max-batch-size`` requests decoding together at a context of
  each ``--decode-context`` tokens, cache on and off. With PYTHONPATH pointing at another
  checkout (``--decode-only``) it measures that code instead, for a before/after comparison.

Prints JSON and writes benchmarks/results/prefix_cache.json (not with --decode-only).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def load(args):
    import torch

    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.models.default_model import default_checkpoint_dir
    from megatron_coord.parallel_state import single_process_state

    torch.set_num_threads(args.threads)
    return load_model(args.model or default_checkpoint_dir(), single_process_state())


def make_engine(model, caching: bool, max_batch_size: int):
    from megatron_coord.engine import InferenceEngine

    if "prefix_caching" in inspect.signature(InferenceEngine).parameters:
        return InferenceEngine(model, max_batch_size=max_batch_size, prefix_caching=caching)
    return InferenceEngine(model, max_batch_size=max_batch_size)  # a checkout without it


def request(rid: int, prompt: list[int], tokens: int):
    from megatron_coord.engine.tp_broadcast import NewRequest
    from megatron_coord.sampling_params import SamplingParams

    params = SamplingParams(top_k=1, num_tokens_to_generate=tokens, termination_id=-1)
    return NewRequest(rid, prompt, params, 0)


def prompts(args) -> list[list[int]]:
    rng = random.Random(0)
    prefix = [rng.randrange(50000) for _ in range(args.prefix_len)]
    return [
        prefix + [rng.randrange(50000) for _ in range(args.suffix_len)]
        for _ in range(args.requests * args.repeat + 1)
    ]


def prefill(args, model) -> dict:
    """Per-request prefill step time, each request alone; cache on and off interleaved."""
    engines = {"on": make_engine(model, True, 8), "off": make_engine(model, False, 8)}
    times: dict[str, list[float]] = {"on": [], "off": []}
    prefilled: dict[str, list[int]] = {"on": [], "off": []}
    for rid, prompt in enumerate(prompts(args)):
        for name, engine in engines.items():
            engine.add_request(request(rid, prompt, 1))
            start = time.perf_counter()
            result = engine.step()
            times[name].append(time.perf_counter() - start)
            prefilled[name].append(result.prefill_tokens)
            assert result.finished and not engine.has_work
    out = {}
    for name in engines:
        hits = times[name][1:]  # the first request computed the prefix on both sides
        out[name] = {
            "first_request_ms": round(times[name][0] * 1e3, 2),
            "median_ms": round(statistics.median(hits) * 1e3, 2),
            "min_ms": round(min(hits) * 1e3, 2),
            "prefilled_tokens_per_request": statistics.median(prefilled[name][1:]),
        }
    out["speedup_median"] = round(out["off"]["median_ms"] / out["on"]["median_ms"], 2)
    out["stats_on"] = engines["on"].blocks.stats()
    return out


def batch(args, model) -> dict:
    """All requests in one prefill step (the cache warmed by one request first)."""
    batch_prompts = prompts(args)[: args.requests + 1]
    out: dict = {}
    for i in range(args.repeat + 1):  # the first round warms up
        for name, caching in (("on", True), ("off", False)):
            engine = make_engine(model, caching, args.requests)
            engine.add_request(request(0, batch_prompts[0], 1))
            engine.step()
            for rid, prompt in enumerate(batch_prompts[1:], 1):
                engine.add_request(request(rid, prompt, 1))
            start = time.perf_counter()
            result = engine.step()
            if i:
                out.setdefault(name, []).append(time.perf_counter() - start)
            assert len(result.finished) == args.requests
    summary = {name: round(statistics.median(v) * 1e3, 2) for name, v in out.items()}
    return {
        "requests": args.requests,
        "on_ms": summary["on"],
        "off_ms": summary["off"],
        "speedup": round(summary["off"] / summary["on"], 2),
    }


def decode_run(model, caching: bool, args, context: int, rng: random.Random) -> float:
    """One full batch prefilled at ``context`` tokens, then the mean decode step time."""
    engine = make_engine(model, caching, args.max_batch_size)
    for rid in range(args.max_batch_size):
        prompt = [rng.randrange(50000) for _ in range(context)]
        engine.add_request(request(rid, prompt, args.decode_steps + 1))
    engine.step()  # prefill
    start = time.perf_counter()
    for _ in range(args.decode_steps):
        engine.step()
    return (time.perf_counter() - start) / args.decode_steps


def decode(args, model) -> dict:
    """Median decode step time per context, cache on and off alternating (one warm-up each)."""
    rng = random.Random(1)
    out = {}
    for context in args.decode_context:
        runs: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(args.repeat + 1):
            for name in runs:
                step = decode_run(model, name == "on", args, context, rng)
                if i:
                    runs[name].append(step)
        out[str(context)] = {
            f"{name}_step_ms": round(statistics.median(v) * 1e3, 3) for name, v in runs.items()
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument(
        "--decode-context", type=lambda s: [int(x) for x in s.split(",")], default=[32, 512]
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--decode-only", action="store_true")
    args = parser.parse_args()
    model = load(args)
    import megatron_coord

    results = {"code": os.path.dirname(megatron_coord.__file__), "args": vars(args)}
    if not args.decode_only:
        results["prefill"] = prefill(args, model)
        results["batch"] = batch(args, model)
    results["decode"] = decode(args, model)
    if args.decode_only:
        print(json.dumps(results, indent=1))
    else:
        sys.path.insert(0, HERE)
        from _common import RESULTS, write_results

        write_results(os.path.join(RESULTS, "prefix_cache.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
