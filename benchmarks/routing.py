"""Routing policies under a heavy-tailed workload: round_robin vs least_loaded, same schedule.

Four replicas are SteppedFakeEngine processes (megatron_coord/fake_engine.py): continuous
batching of at most ``--max-batch-size`` requests, and a step that really sleeps
``A + B * batch_tokens`` seconds (prompt tokens prefilled in the step + one per decoding
request), so a replica holding more work runs every one of its requests slower and queues new
ones. They speak the real protocol, HEARTBEAT load reports included. A real coordinator process
(``routing=`` each policy in turn) and a real InferenceClient replay the same seeded workload:
lognormal prompt lengths, Pareto generation lengths (heavy tail), Poisson arrivals, token
prompts. Latency is submit -> final record at the client; makespan is first submit -> last
record.

Run: ``python benchmarks/routing.py [--requests 600 --rate 80 --seed 0 --extra-seeds 1 2]``
(about 20 s per seed). Prints JSON, writes
benchmarks/results/routing.json and benchmarks/results/routing.png (latency CDFs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_coord.client import InferenceClient  # noqa: E402
from megatron_coord.coordinator import DataParallelInferenceCoordinator  # noqa: E402
from megatron_coord.testing.fake_engine import ByteTokenizer, spawn  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
POLICIES = ("round_robin", "least_loaded")


def workload(args: argparse.Namespace) -> list[tuple[float, int, int]]:
    """(arrival time s, prompt tokens, tokens to generate) per request, seeded."""
    rng = random.Random(args.seed)
    requests, now = [], 0.0
    for _ in range(args.requests):
        now += rng.expovariate(args.rate)
        prompt = min(args.max_prompt, max(1, round(rng.lognormvariate(args.prompt_mu, 1.0))))
        generate = min(args.max_generate, max(1, round(args.generate_min * rng.paretovariate(1.2))))
        requests.append((now, prompt, generate))
    return requests


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def replay(address: str, requests: list[tuple[float, int, int]]) -> dict[str, Any]:
    """Submit each request at its arrival time; collect latencies, ranks and the makespan."""
    client = InferenceClient(address)
    await client.start()
    loop = asyncio.get_running_loop()
    futures = []
    start = loop.time()
    for arrival, prompt, generate in requests:
        delay = start + arrival - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        params = {"num_tokens_to_generate": generate, "top_k": 1}
        futures.append(client.add_request([(7 + i) % 250 + 1 for i in range(prompt)], params))
    records = await asyncio.gather(*futures)
    makespan = loop.time() - start
    await client.stop_engines()
    client.stop()
    latencies = [r["latency"] for r in records]
    ranks = [r["requests"][0]["data_parallel_rank"] for r in records]
    tokens = [len(r["requests"][0]["generated_tokens"]) for r in records]
    assert tokens == [g for _, _, g in requests], "an engine generated the wrong number of tokens"
    return {"latencies": latencies, "ranks": ranks, "makespan_s": makespan}


def run_policy(policy: str, args: argparse.Namespace, requests: list) -> dict[str, Any]:
    """A fresh coordinator (routing=policy) and four fresh stepped engines; replay; summarize."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    ready = ctx.Event()
    coordinator = ctx.Process(
        target=DataParallelInferenceCoordinator.entrypoint,
        args=(child, ready, args.replicas, ByteTokenizer()),
        kwargs={"routing": policy},
        daemon=True,
    )
    coordinator.start()
    address = parent.recv()
    step_time = (args.step_base, args.step_per_token)
    engines = [
        spawn(address, rank, step_time=step_time, max_batch_size=args.max_batch_size)
        for rank in range(args.replicas)
    ]
    try:
        if not ready.wait(60):
            raise RuntimeError("engines did not register")
        result = asyncio.run(replay(address, requests))
    finally:
        coordinator.join(30)
        for engine in engines:
            engine.wait(30)
    latencies = result["latencies"]
    work = [0] * args.replicas
    for rank, (_, prompt, generate) in zip(result["ranks"], requests, strict=True):
        work[rank] += prompt + generate
    return {
        "makespan_s": round(result["makespan_s"], 3),
        "latency_p50_s": round(percentile(latencies, 0.50), 4),
        "latency_p90_s": round(percentile(latencies, 0.90), 4),
        "latency_p99_s": round(percentile(latencies, 0.99), 4),
        "latency_mean_s": round(sum(latencies) / len(latencies), 4),
        "tokens_per_replica": work,
        "latencies_s": [round(x, 5) for x in latencies],
    }


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    """Latency CDF per policy (log x), p50/p99 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, color in zip(POLICIES, ("tab:red", "tab:blue"), strict=True):
        ordered = sorted(results[policy]["latencies_s"])
        ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
        r = results[policy]
        label = f"{policy}: p50 {r['latency_p50_s']:.2f} s, p99 {r['latency_p99_s']:.2f} s"
        ax.step(ordered, ys, where="post", color=color, label=label)
        ax.axvline(r["latency_p99_s"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("request latency (s, submit -> final record)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("4 replicas, heavy-tailed workload, step = A + B * batch tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def other_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same comparison on another seeded workload (summary numbers only)."""
    requests = workload(argparse.Namespace(**{**vars(args), "seed": seed}))
    out: dict[str, Any] = {"seed": seed}
    for policy in POLICIES:
        r = run_policy(policy, args, requests)
        out[policy] = {k: r[k] for k in ("latency_p50_s", "latency_p99_s", "makespan_s")}
    rr, ll = out["round_robin"], out["least_loaded"]
    out["ratio_p99"] = round(ll["latency_p99_s"] / rr["latency_p99_s"], 3)
    out["ratio_p50"] = round(ll["latency_p50_s"] / rr["latency_p50_s"], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rate", type=float, default=80.0, help="arrivals per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--prompt-mu", type=float, default=4.0, help="lognormal mu (e^4 = 55)")
    parser.add_argument("--max-prompt", type=int, default=2048)
    parser.add_argument("--generate-min", type=int, default=8, help="Pareto scale")
    parser.add_argument("--max-generate", type=int, default=1024)
    parser.add_argument("--step-base", type=float, default=0.0005, help="A (s)")
    parser.add_argument("--step-per-token", type=float, default=0.00025, help="B (s per token)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument(
        "--extra-seeds",
        type=int,
        nargs="*",
        default=[],
        help="also run these workload seeds and report their p50/p99/makespan (robustness)",
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    requests = workload(args)
    results = {policy: run_policy(policy, args, requests) for policy in POLICIES}
    rr, ll = results["round_robin"], results["least_loaded"]
    summary = {
        "benchmark": "routing",
        "host": f"{platform.node()} ({os.cpu_count()} cores)",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workload": {
            "requests": args.requests,
            "rate_per_s": args.rate,
            "seed": args.seed,
            "prompt_tokens": f"lognormal(mu={args.prompt_mu}, sigma=1) capped {args.max_prompt}",
            "generate_tokens": f"{args.generate_min} * pareto(1.2) capped {args.max_generate}",
            "prompt_tokens_total": sum(p for _, p, _ in requests),
            "generate_tokens_total": sum(g for _, _, g in requests),
            "generate_tokens_max": max(g for _, _, g in requests),
        },
        "replicas": {
            "count": args.replicas,
            "step_time": f"{args.step_base} + {args.step_per_token} * batch_tokens s",
            "max_batch_size": args.max_batch_size,
        },
        "ratio_p99_least_loaded_over_round_robin": round(
            ll["latency_p99_s"] / rr["latency_p99_s"], 3
        ),
        "ratio_p50_least_loaded_over_round_robin": round(
            ll["latency_p50_s"] / rr["latency_p50_s"], 3
        ),
        "ratio_makespan_least_loaded_over_round_robin": round(
            ll["makespan_s"] / rr["makespan_s"], 3
        ),
        "target_p99_ratio": 0.7,
    }
    summary["policies"] = {
        p: {k: v for k, v in r.items() if k != "latencies_s"} for p, r in results.items()
    }
    summary["other_seeds"] = [other_seed(seed, args) for seed in args.extra_seeds]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "routing.json"), "w") as f:
        json.dump({**summary, "latencies_s": {p: r["latencies_s"] for p, r in results.items()}}, f)
    if not args.no_plot:
        plot(results, os.path.join(RESULTS, "routing.png"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
