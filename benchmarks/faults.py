"""Load held while replicas are killed (kill -9) and restarted; prints JSON.

A standalone coordinator (python -m megatron_coord.coordinator) serves two replicas, each its own
torchrun job (launch/serve.py --coordinator-address) of the embedded default model. A closed-loop
client keeps ``--concurrency`` requests in flight. First a fault-free phase measures the baseline
throughput; then, during the fault phase, every ``--kill-every`` seconds one replica's serving
rank is faulted, alternately SIGKILLed ("kill9": its connection closes) and SIGSTOPped ("hang":
only heartbeat silence reveals it; SIGKILLed once declared dead), and a fresh job is started in
its place at once. Last, an overload phase sends ``--burst`` requests at once against the
coordinator's limit of ``MAX_OUTSTANDING`` in flight.

Reported: requests/s held (fault-free and with faults), requests lost (submitted but never
answered: must be 0), errors by code, and per fault: time until the coordinator declared the
engine dead (``detect_s``, from STATS), time until every request that was in flight at the
fault was answered (``last_affected_answer_s``; an upper bound on the affected requests, since
it includes those on the survivor), and time until the restarted replica registered; for the
overload: answers by kind, none lost or doubled, the coordinator's RSS before/peak/after. Last,
the coordinator itself is SIGKILLed under load and restarted on the same port: when the client
noticed, reconnected and the replicas registered again, and requests lost (must be 0, the
client resubmits) and failed.

Freeze and thaw (between the replica faults and the overload): under load, a quarter of it
streamed, one replica's serving rank is SIGSTOPped for twice the engine timeout (a long GC
pause, swapping, a stalled file system) and SIGCONTed, then both at once (every replica looks
lost: their requests wait ``--failover-wait``). Each is declared dead, comes back and gets
back what it held: reported are when it was declared dead and came back, and requests lost
and failed (both must be 0) and streams whose tokens did not add up to their final record
(must be 0).

    python benchmarks/faults.py [--duration 40] [--baseline 10] [--kill-every 6]
        [--phases faults,freeze,overload,restart]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _common import write_results  # noqa: E402

from megatron_coord.client import InferenceClient, RequestError  # noqa: E402
from megatron_coord.coordinator_stats import CoordinatorStats  # noqa: E402
from megatron_coord.models.default_model import default_checkpoint_dir  # noqa: E402
from megatron_coord.sampling_params import SamplingParams  # noqa: E402
from megatron_coord.testing.fault_harness import (  # noqa: E402
    ReplicaJob,
    StandaloneCoordinator,
    StatsProbe,
    free_port,
)

PROMPTS = ["The quick brown fox", "Data parallel inference", "Hello world", "One two three"]


class Load:
    """Closed-loop load: ``concurrency`` workers, each submitting the next request at once."""

    def __init__(
        self, client: InferenceClient, concurrency: int, tokens: int, stream_every: int = 0
    ) -> None:
        self.client = client
        self.concurrency = concurrency
        self.params = SamplingParams(num_tokens_to_generate=tokens, top_k=1)
        self.stream_every = stream_every  # every n-th request streams (0: none)
        self.outstanding: dict[int, float] = {}
        self.answered_at: dict[int, float] = {}
        self.completed = 0
        self.errors: Counter[str] = Counter()
        self.submitted = 0
        self.streams = 0
        self.stream_mismatches = 0  # streams whose parts did not add up to their record
        self.running = True

    async def worker(self, index: int) -> None:
        while self.running:
            request_id = self.submitted
            self.submitted += 1
            self.outstanding[request_id] = time.monotonic()
            try:
                await self._one(request_id, PROMPTS[request_id % len(PROMPTS)])
                self.completed += 1
            except RequestError as exc:
                self.errors[exc.code] += 1
            except ConnectionError:  # the coordinator was away past the reconnect deadline
                self.errors["connection"] += 1
            del self.outstanding[request_id]
            self.answered_at[request_id] = time.monotonic()

    async def _one(self, request_id: int, prompt: str) -> None:
        if not self.stream_every or request_id % self.stream_every:
            await self.client.add_request(prompt, self.params)
            return
        self.streams += 1
        streamed: list[int] = []
        async for part in self.client.add_request_streaming(prompt, self.params):
            if "requests" in part:  # the final record: every token streamed once, in order
                if streamed != part["requests"][0]["generated_tokens"]:
                    self.stream_mismatches += 1
            else:
                streamed += part["tokens"]

    def start(self) -> None:
        self._base = self.completed
        self._workers = [asyncio.create_task(self.worker(i)) for i in range(self.concurrency)]
        self._started = time.monotonic()

    async def finish(self) -> dict[str, float]:
        """Stop, drain; requests/s over the window since ``start``."""
        done = self.completed - self._base
        elapsed = time.monotonic() - self._started
        self.running = False
        await asyncio.wait(self._workers, timeout=120)
        return {"seconds": round(elapsed, 2), "completed": done, "rps": round(done / elapsed, 1)}

    async def run(self, seconds: float) -> dict[str, float]:
        """Run for ``seconds`` plus the drain; requests/s over the measured window."""
        self.start()
        await asyncio.sleep(seconds)
        return await self.finish()


async def _wait_engines(stats: CoordinatorStats, count: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        view = await stats.query(5.0)
        if view is not None and len(view["engines"]) == count:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{count} engines did not register within {timeout} s")


async def _kill_one(
    load: Load,
    stats: CoordinatorStats,
    jobs: list[ReplicaJob],
    address: str,
    model: str,
    fault: str,
) -> dict[str, float]:
    """Fault the oldest replica's serving rank, start a replacement, measure recovery.

    ``kill9``: SIGKILL (the coordinator sees the connection close). ``hang``: SIGSTOP (the
    connection stays open; only heartbeat silence reveals it), SIGKILLed once declared dead."""
    view = await stats.query(5.0)
    victim = view["engines"][0]
    lost_before = view["engines_lost"]
    in_flight = set(load.outstanding)
    pid = victim["info"]["pid"]
    os.kill(pid, signal.SIGKILL if fault == "kill9" else signal.SIGSTOP)
    killed = time.monotonic()
    jobs.append(ReplicaJob(address, model, *REPLICA_ARGS))  # the restart
    detect = None
    while detect is None:
        view = await stats.query(5.0)
        if view is not None and view["engines_lost"] > lost_before:
            detect = time.monotonic() - killed
        else:
            await asyncio.sleep(0.01)
    if fault == "hang":
        os.kill(pid, signal.SIGKILL)
    while in_flight & set(load.outstanding):
        await asyncio.sleep(0.01)
    last = max((load.answered_at.get(r, killed) for r in in_flight), default=killed) - killed
    await _wait_engines(stats, 2, 300)
    rejoin = time.monotonic() - killed
    return {
        "fault": fault,
        "detect_s": round(detect, 3),
        "in_flight_at_kill": len(in_flight),
        "last_affected_answer_s": round(last, 3),
        "restart_registered_s": round(rejoin, 1),
    }


async def _session(args: argparse.Namespace, address: str, jobs: list, model: str) -> dict:
    stats = CoordinatorStats(address)
    await _wait_engines(stats, 2, 300)
    client = InferenceClient(address)
    await client.start()
    try:
        baseline = await Load(client, args.concurrency, args.tokens).run(args.baseline)
        load = Load(client, args.concurrency, args.tokens)
        kills: list[dict] = []

        end = time.monotonic() + args.duration

        async def injector() -> None:
            """Alternate kill -9 and hang faults; none starts in the last 5 s of the phase."""
            for n in range(1_000_000):
                await asyncio.sleep(args.kill_every)
                if time.monotonic() > end - 5.0:
                    return
                fault = ("kill9", "hang")[n % 2]
                kills.append(await _kill_one(load, stats, jobs, address, model, fault))

        task = asyncio.create_task(injector())
        faulted = await load.run(args.duration)
        await task  # a fault under way is measured to its end
        lost = load.submitted - load.completed - sum(load.errors.values())
        final = await stats.query(5.0)
        return {
            "baseline": baseline,
            "with_faults": faulted,
            "requests_submitted": load.submitted,
            "requests_completed": load.completed,
            "requests_lost": lost,
            "errors": dict(load.errors),
            "kills": kills,
            "coordinator": {
                "engines_lost": final["engines_lost"],
                "requests_resubmitted": final["requests_resubmitted"],
                "requests_in_flight_after": final["requests_in_flight"],
            },
        }
    finally:
        client.stop()
        stats.close()


async def _freeze(
    load: Load, stats: CoordinatorStats, pids: list[int], seconds: float
) -> dict[str, float]:
    """SIGSTOP the serving ranks ``pids`` for ``seconds``, then SIGCONT: when the coordinator
    declared them dead, when they were back (registered again with what they held), when the
    last request in flight at the freeze was answered."""
    view = await stats.query(5.0)
    lost, rejoined = view["engines_lost"] + len(pids), view["engines_rejoined"] + len(pids)
    in_flight = set(load.outstanding)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    frozen = time.monotonic()
    detect = None
    try:
        while time.monotonic() - frozen < seconds:
            if detect is None:
                view = await stats.query(5.0)
                if view is not None and view["engines_lost"] >= lost:
                    detect = round(time.monotonic() - frozen, 3)
            await asyncio.sleep(0.05)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    thawed = time.monotonic()
    while True:
        view = await stats.query(5.0)
        if view is not None and view["engines_rejoined"] >= rejoined and len(view["engines"]) == 2:
            break
        await asyncio.sleep(0.05)
    back = time.monotonic() - thawed
    while in_flight & set(load.outstanding):
        await asyncio.sleep(0.01)
    last = max((load.answered_at.get(r, frozen) for r in in_flight), default=frozen) - frozen
    return {
        "replicas_frozen": len(pids),
        "frozen_s": round(thawed - frozen, 2),
        "declared_dead_after_s": detect,
        "back_after_thaw_s": round(back, 3),
        "in_flight_at_freeze": len(in_flight),
        "last_affected_answer_s": round(last, 3),
    }


async def _freeze_thaw(args: argparse.Namespace, address: str) -> dict:
    """Under load (a quarter streamed), one replica frozen for twice the engine timeout, then
    both: a false death must lose nothing (0 lost, 0 failed, every stream adds up)."""
    stats = CoordinatorStats(address)
    await _wait_engines(stats, 2, 300)
    client = InferenceClient(address)
    await client.start()
    try:
        before = await stats.query(5.0)
        load = Load(client, args.concurrency, args.tokens, stream_every=4)
        load.start()
        freezes = []
        for count in (1, 2):
            await asyncio.sleep(2.0)
            view = await stats.query(5.0)
            pids = [engine["info"]["pid"] for engine in view["engines"][:count]]
            freezes.append(await _freeze(load, stats, pids, 2 * ENGINE_TIMEOUT_S))
        await asyncio.sleep(2.0)
        window = await load.finish()
        after = await stats.query(5.0)
        counters = ("engines_lost", "engines_rejoined", "requests_adopted", "requests_resubmitted")
        return {
            "load": window,
            "freezes": freezes,
            "requests_submitted": load.submitted,
            "requests_lost": load.submitted - load.completed - sum(load.errors.values()),
            "requests_failed": dict(load.errors),
            "streams": load.streams,
            "stream_mismatches": load.stream_mismatches,
            "coordinator": {key: after[key] - before[key] for key in counters}
            | {"late_results_dropped": after["late_results_dropped"]},
        }
    finally:
        client.stop()
        stats.close()


async def _restart_coordinator(
    args: argparse.Namespace, box: list[StandaloneCoordinator], model: str, port: int
) -> dict:
    """Kill -9 the coordinator under load and start a new one on the same port: when the
    client noticed, reconnected (resubmitting what nothing reached it of), the replicas
    registered again; requests lost (must be 0) and failed."""
    client = InferenceClient(box[0].address)
    await client.start()
    try:
        load = Load(client, args.concurrency, args.tokens)
        running = asyncio.create_task(load.run(args.restart_phase))
        await asyncio.sleep(args.restart_phase / 3)
        in_flight = len(load.outstanding)
        box[0].process.kill()
        box[0].process.wait()
        killed = time.monotonic()
        while client.connected.is_set():
            await asyncio.sleep(0.005)
        detected = time.monotonic() - killed
        box[0] = await asyncio.to_thread(_coordinator, model, port, args.coordinator_log_level)
        started = time.monotonic() - killed
        await client.connected.wait()
        reconnected = time.monotonic() - killed
        stats = CoordinatorStats(box[0].address)
        await _wait_engines(stats, 2, 120)
        rejoined = time.monotonic() - killed
        stats.close()
        window = await running
        return {
            "load": window,
            "in_flight_at_kill": in_flight,
            "client_detected_s": round(detected, 3),
            "new_coordinator_bound_s": round(started, 2),
            "client_reconnected_s": round(reconnected, 2),
            "replicas_registered_again_s": round(rejoined, 2),
            "requests_submitted": load.submitted,
            "requests_lost": load.submitted - load.completed - sum(load.errors.values()),
            "requests_failed": dict(load.errors),
        }
    finally:
        client.stop()


def _coordinator(model: str, port: int, log_level: str) -> StandaloneCoordinator:
    args = (
        "--port",
        str(port),
        "--log-level",
        log_level,
        "--engine-timeout",
        str(ENGINE_TIMEOUT_S),
    )
    return StandaloneCoordinator(model, *args, "--max-outstanding", str(MAX_OUTSTANDING))


REPLICA_ARGS = ("--max-batch-size", "8")
MAX_OUTSTANDING = 256  # the coordinator's limit in this benchmark (overload phase)
ENGINE_TIMEOUT_S = 3.0  # the coordinator's (its default); a freeze lasts twice that
PHASES = ("faults", "freeze", "overload", "restart")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def overload(address: str, pid: int, burst: int, tokens: int) -> dict:
    """``burst`` requests sent at once (many times the limit): each gets exactly one answer,
    a result or ``overloaded``, and the coordinator's memory stays bounded."""
    import msgspec
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
    sock.send(encode([1, {"protocol": 1}]))
    assert decode(sock.recv()) == [2]
    rss_before = _rss_mib(pid)
    params = {"num_tokens_to_generate": tokens, "top_k": 1}
    started = time.monotonic()
    for i in range(burst):
        sock.send(encode([3, i, PROMPTS[i % len(PROMPTS)], params]))
    answers: Counter[str] = Counter()
    seen: Counter[int] = Counter()
    rss_peak = rss_before
    while sum(seen.values()) < burst and sock.poll(120_000):
        message = decode(sock.recv())
        seen[message[1]] += 1
        answers["completed" if message[0] == 4 else message[2]] += 1
        if sum(seen.values()) % 1000 == 0:
            rss_peak = max(rss_peak, _rss_mib(pid))
    elapsed = time.monotonic() - started
    sock.close(0)
    context.term()
    return {
        "burst": burst,
        "limit_max_outstanding": MAX_OUTSTANDING,
        "answers": dict(answers),
        "answered_twice": sum(1 for n in seen.values() if n > 1),
        "requests_lost": burst - len(seen),
        "seconds": round(elapsed, 2),
        "coordinator_rss_mib": {"before": rss_before, "peak": rss_peak, "after": _rss_mib(pid)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="fault phase, seconds")
    parser.add_argument("--baseline", type=float, default=10.0, help="fault-free phase, seconds")
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--coordinator-log-level", default="ERROR")
    parser.add_argument("--burst", type=int, default=20000, help="overload phase requests")
    parser.add_argument(
        "--restart-phase", type=float, default=20.0, help="coordinator kill-and-restart, seconds"
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "faults.json"))
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"which to run, in order (of {','.join(PHASES)})"
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if phases - set(PHASES):
        parser.error(f"unknown phases: {sorted(phases - set(PHASES))}")
    model = default_checkpoint_dir()
    port = free_port()
    box = [_coordinator(model, port, args.coordinator_log_level)]
    coordinator = box[0]
    jobs = [ReplicaJob(coordinator.address, model, *REPLICA_ARGS) for _ in range(2)]
    result: dict = {}
    try:
        if "faults" in phases:
            result.update(asyncio.run(_session(args, coordinator.address, jobs, model)))
        if "freeze" in phases:
            result["freeze_thaw"] = asyncio.run(_freeze_thaw(args, coordinator.address))
        pid = coordinator.process.pid
        if "overload" in phases:
            result["overload"] = overload(coordinator.address, pid, args.burst, args.tokens)
        if "restart" in phases:
            result["coordinator_restart"] = asyncio.run(
                _restart_coordinator(args, box, model, port)
            )
        coordinator = box[0]
        probe = StatsProbe(coordinator.address)
        probe.socket.send(b"\x91\x0a")  # STOP: every live replica and the coordinator exit
        probe.close()
        coordinator.wait(60)
    finally:
        for job in jobs:
            job.kill()
        for each in {coordinator, *box}:
            each.kill()
    result["config"] = {
        "model": "embedded default (4-layer hidden-256 Llama, GPT-2 vocab)",
        "replicas": 2,
        "replica_args": list(REPLICA_ARGS),
        "concurrency": args.concurrency,
        "tokens_per_request": args.tokens,
        "kill_every_s": args.kill_every,
        "engine_timeout_s": ENGINE_TIMEOUT_S,
        "phases": args.phases,
        "max_outstanding": MAX_OUTSTANDING,
        "host": f"{os.cpu_count()}-core CPU, gloo, shared machine",
    }
    write_results(args.out, result, indent=2)


if __name__ == "__main__":
    main()
