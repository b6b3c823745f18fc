"""Throughput and latency against the number of data-parallel replicas (1, 2, 4, 8).

One coordinator (ours), N engine processes, and a fixed client load: ``--clients`` load-client
processes (raw DEALER sockets, the same as coordinator_throughput.py) that each keep
``--window`` requests in flight. Two kinds of engine:

* ``simulated``: a continuous-batching engine that sleeps ``--step-ms`` per decode step, admits
  up to ``--max-batch`` requests and finishes each after its ``--generate-tokens`` steps. It
  costs almost no CPU, so the picture shows what adding replicas buys when the engines are the
  bottleneck (as with real models): ideal capacity is N * max_batch / (tokens * step) req/s.
* ``instant``: megatron_coord.testing.fake_engine, which answers at once. Then the coordinator, clients
  and engines share the machine's cores, and the curve shows the coordinator-bound ceiling and
  what extra replica processes cost it.

Run: ``python benchmarks/scaling.py [--duration 3] [--replicas 1 2 4 8]``. Prints JSON and
writes it to benchmarks/results/scaling.json; ``python benchmarks/plot.py`` draws it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from collections import deque
from typing import Any

import msgspec

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from _common import RESULTS, percentiles, start_coordinator, write_results  # noqa: E402
from coordinator_throughput import run_load, stop_procs  # noqa: E402

from megatron_coord.protocol import Headers  # noqa: E402
from megatron_coord.testing.fake_engine import FakeEngine, recv_ready, spawn  # noqa: E402

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class SimulatedEngine(FakeEngine):
    """A fake engine with a decode-step clock: continuous batching of at most ``max_batch``
    requests, one token per request per ``step_s`` seconds, finished records sent per step.

    The tokens are FakeEngine's (the prompt echoed), so replies stay checkable; only the timing
    imitates a model. Sleeping, not spinning, keeps the CPU for the coordinator and clients.
    """

    def __init__(self, address: str, rank: int, step_s: float, max_batch: int) -> None:
        super().__init__(address, rank)
        self.step_s = step_s
        self.max_batch = max_batch
        self.queue: deque[list[Any]] = deque()
        self.active: list[list[Any]] = []  # [submit, steps left]

    def _drain(self, block: bool) -> bool:
        """Handle every ready message (waiting for one if ``block``); False after STOP_ACK."""
        submits: list[list[Any]] = []
        running = True
        for raw in recv_ready(self.socket, block):
            running = self.handle(_decode(raw), submits) and running
        self.queue.extend(submits)
        return running

    def _step(self) -> None:
        """Advance every active request one token; reply for the finished ones."""
        finished, still = [], []
        for entry in self.active:
            entry[1] -= 1
            (finished if entry[1] <= 0 else still).append(entry)
        self.active = still
        if finished:
            records = [self.record(*entry[0]) for entry in finished]
            self.socket.send(_encode([int(Headers.ENGINE_REPLY), records]))
            self.served += len(records)

    def serve(self) -> None:
        """Register, then step until the coordinator confirms STOP."""
        self.register()
        running = True
        step_start = time.perf_counter()
        while running:
            running = self._drain(block=not self.active and not self.queue)
            while self.queue and len(self.active) < self.max_batch:
                submit = self.queue.popleft()
                self.active.append([submit, max(1, submit[2].get("num_tokens_to_generate", 1))])
            if not self.active:
                continue
            now = time.perf_counter()
            step_start = max(step_start + self.step_s, now)  # idle: the next step starts now
            time.sleep(max(0.0, step_start + self.step_s - now))
            self._step()
        self.socket.close()
        self.context.term()


def simulated_engine_main(address: str, rank: int, step_s: float, max_batch: int) -> None:
    """Target of a simulated engine's process."""
    SimulatedEngine(address, rank, step_s, max_batch).serve()


def start_deployment(kind: str, replicas: int, args: argparse.Namespace) -> tuple[str, list]:
    """Our coordinator and ``replicas`` engines of ``kind``, each in its own process."""
    address, coordinator, ready = start_coordinator(replicas)
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = [coordinator]
    for rank in range(replicas):
        if kind == "instant":
            procs.append(spawn(address, rank))
        else:
            engine = ctx.Process(
                target=simulated_engine_main,
                args=(address, rank, args.step_ms / 1e3, args.max_batch),
                daemon=True,
            )
            engine.start()
            procs.append(engine)
    if not ready.wait(120):
        stop_procs(procs)
        raise RuntimeError(f"{replicas} {kind} engines did not register")
    return address, procs


def measure(kind: str, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    """Requests/s and latency percentiles of one deployment under the fixed load."""
    address, procs = start_deployment(kind, replicas, args)
    latencies = run_load(address, True, args, procs)
    return {
        "replicas": replicas,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / args.duration, 1),
        **percentiles(latencies, 3),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the package had uncommitted changes (shared tree)."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "package_dirty": bool(git("status", "--porcelain", "--", "../megatron_coord")),
    }


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every option's default."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 2, 4, 8], help="replica counts to measure"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=["simulated", "instant"],
        default=["simulated", "instant"],
        help="which engine kinds to measure",
    )
    parser.add_argument("--clients", type=int, default=2, help="load-client processes")
    parser.add_argument("--window", type=int, default=32, help="requests in flight per client")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt")
    parser.add_argument(
        "--generate-tokens", type=int, default=8, help="tokens per request (simulated: steps)"
    )
    parser.add_argument("--step-ms", type=float, default=5.0, help="simulated decode step (ms)")
    parser.add_argument("--max-batch", type=int, default=8, help="simulated engine batch size")
    parser.add_argument(
        "--output", default=os.path.join(RESULTS, "scaling.json"), help="where the JSON goes"
    )
    args = parser.parse_args()
    for name in ("duration", "step_ms"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.replicas) < 1 or min(args.clients, args.window, args.max_batch) < 1:
        parser.error("--replicas, --clients, --window and --max-batch must be at least 1")

    capacity = args.max_batch / (args.generate_tokens * args.step_ms / 1e3)
    report: dict[str, Any] = {
        "benchmark": "scaling",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "code": code_version(),
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "simulated_capacity_per_replica_rps": capacity,
        "in_flight": args.clients * args.window,
        "series": {},
    }
    for kind in args.engines:
        report["series"][kind] = []
        for replicas in args.replicas:
            point = measure(kind, replicas, args)
            print(json.dumps({"engines": kind, **point}), file=sys.stderr, flush=True)
            report["series"][kind].append(point)
    write_results(args.output, report, indent=2)


if __name__ == "__main__":
    main()
