"""The coordinator at scale: CPU time per routed request at 4-256 replicas and 10-10,000 clients.

On 2 cores, one process per simulated engine would measure the scheduler, not the coordinator,
so engines and clients are multiplexed: ``--engine-procs`` processes hold every engine's DEALER
(hundreds in one process, one poller), ``--client-procs`` processes hold every client's DEALER.
Engines register with our REGISTER, heartbeat every second with ``processed_tokens`` (so the
least-loaded policy's load correction runs), and answer each request ``--engine-delay-ms`` after
it arrived (0: at once, in the same wake-up), each in a reply of its own (``--reply-batch 1``:
with 4 engines a batched reply would carry 64 times the records of one at 256, and the
comparison would measure message batching, not the coordinator). Clients CONNECT
once and then keep ``--window`` requests in flight in total (closed loop: each reply sends the
next request, from the next client in turn), so every configuration offers the coordinator the
same concurrency whatever the number of clients, and the CPU per request compares like with
like; prompts are token lists (no tokenizing).

What is measured, per routing policy, replica count and client count:

* the coordinator process's own CPU time per routed request (all its threads, from
  ``/proc/<pid>/task/*/schedstat``: nanoseconds on CPU, far steadier on a shared machine than
  wall-clock throughput), over the requests answered in the phase;
* throughput (answered requests/s) and p50/p99 latency (client send to reply);
* its idle CPU share with the peers connected (heartbeats, ZMTP pings, liveness: a cost per
  second, not per request) measured for ``--idle`` s first, and the CPU per request net of it;
* the coordinator's RSS per connected client (RSS with the clients connected minus before);
* once: coordinator RSS per 10,000 requests in flight (engines that hold every request).

Run: ``python benchmarks/scale_out.py [--duration 3] [--window 256]``. Prints JSON and writes
benchmarks/results/scale_out.json; ``benchmarks/plot.py --only scale_out`` draws it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS, percentiles, write_results  # noqa: E402

PROMPT = list(range(1, 17))
SAMPLING = {"num_tokens_to_generate": 4}


# ---------------------------------------------------------------------- coordinator side


def coordinator_main(pipe: Any, ready: Any, replicas: int, policy: str) -> None:
    """The coordinator, spawned as a launch spawns it, with the routing policy asked for."""
    from megatron_coord.coordinator import DataParallelInferenceCoordinator
    from megatron_coord.testing.fake_engine import ByteTokenizer

    DataParallelInferenceCoordinator.entrypoint(
        pipe, ready, replicas, ByteTokenizer(), routing=policy, max_outstanding=1 << 20
    )


def cpu_ns(pid: int, main_only: bool = False) -> int:
    """Nanoseconds ``pid`` (every thread of it, or its main thread: the Python loop, without
    libzmq's I/O threads) has spent on a CPU."""
    total = 0
    for task in [str(pid)] if main_only else os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    return total


def wakeups(pid: int) -> int:
    """Voluntary context switches of ``pid``'s main thread: each is the loop blocking in its
    poll with nothing to do, so their count is the number of wake-ups."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------- engines


def engine_host(
    address: str, ranks: list[int], delay_s: float, hold: bool, batch: int, stop: Any
) -> None:
    """Many simulated engines in one process: each a DEALER that registers, heartbeats each
    second and answers each request ``delay_s`` after it came (``hold``: never), at most
    ``batch`` records per ENGINE_REPLY."""
    import collections

    import msgspec
    import zmq

    from megatron_coord.protocol import PROTOCOL_VERSION, Headers

    encode, decode = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder().decode
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, len(ranks) + 64)
    sockets = []
    for rank in ranks:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(address)
        sock.send(
            encode(
                [int(Headers.REGISTER), {"data_parallel_rank": rank, "protocol": PROTOCOL_VERSION}]
            )
        )
        sockets.append(sock)
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    waiting: collections.deque = collections.deque()  # (due, socket index, request_id)
    processed = [0] * len(sockets)
    index_of = {sock: i for i, sock in enumerate(sockets)}
    submit, reply, beat = (
        int(Headers.SUBMIT_REQUEST),
        int(Headers.ENGINE_REPLY),
        int(Headers.HEARTBEAT),
    )
    next_beat = time.monotonic() + 1.0
    generated = PROMPT[: SAMPLING["num_tokens_to_generate"]]
    while not stop.is_set():
        now = time.monotonic()
        timeout = 100 if not waiting else max(0, (waiting[0][0] - now) * 1000)
        for sock, _ in poller.poll(min(timeout, 100)):
            i = index_of[sock]
            try:
                while True:
                    message = decode(sock.recv(zmq.NOBLOCK))
                    if message[0] == submit and not hold:
                        waiting.append((time.monotonic() + delay_s, i, message[1]))
            except zmq.Again:
                pass
        now = time.monotonic()
        out: dict[int, list] = {}
        while waiting and waiting[0][0] <= now:
            _, i, request_id = waiting.popleft()
            record = {
                "requests": [
                    {
                        "request_id": request_id,
                        "prompt_tokens": PROMPT,
                        "generated_tokens": generated,
                        "status": "COMPLETED",
                        "finish_reason": "length",
                    }
                ]
            }
            out.setdefault(i, []).append(record)
            processed[i] += len(PROMPT) + len(generated)
        for i, records in out.items():
            for first in range(0, len(records), batch):
                sockets[i].send(encode([reply, records[first : first + batch]]))
        if now >= next_beat:
            next_beat = now + 1.0
            for i, sock in enumerate(sockets):
                sock.send(encode([beat, {"processed_tokens": processed[i], "healthy": True}]))
    for sock in sockets:
        sock.close(0)
    context.term()


# ---------------------------------------------------------------------- clients


def client_host(
    address: str, clients: int, window: int, duration: float, connected: Any, go: Any, out: Any
) -> None:
    """Many clients in one process: ``clients`` DEALERs that CONNECT, then ``window`` requests
    kept in flight for ``duration`` s, each new one from the next client in turn (closed loop:
    the same in-flight count whatever the number of clients); sends latencies back."""
    import msgspec
    import zmq

    from megatron_coord.protocol import Headers

    encode, decode = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder().decode
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, clients + 64)
    sockets = []
    for _ in range(clients):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sock.send(encode([int(Headers.CONNECT)]))
        sockets.append(sock)
    for sock in sockets:  # every CONNECT_ACK (blocking: the coordinator answers each)
        if not sock.poll(60_000):
            raise RuntimeError("no CONNECT_ACK")
        sock.recv()
    connected.set()
    go.wait()
    poller = zmq.Poller()
    pending: dict[Any, int] = {}  # socket -> requests it awaits (polled only while > 0)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    submit = int(Headers.SUBMIT_REQUEST)
    state = {"sent": 0, "next": 0}

    def send_one() -> None:
        sock = sockets[state["next"]]
        state["next"] = (state["next"] + 1) % clients
        request_id = state["sent"]
        state["sent"] = request_id + 1
        sent_at[request_id] = time.perf_counter()
        sock.send(encode([submit, request_id, PROMPT, SAMPLING]))
        if pending.get(sock, 0) == 0:
            poller.register(sock, zmq.POLLIN)
        pending[sock] = pending.get(sock, 0) + 1

    end = time.monotonic() + duration
    for _ in range(window):
        send_one()
    while sent_at:
        running = time.monotonic() < end
        if not running and time.monotonic() > end + 10:
            break
        for sock, _ in poller.poll(100):
            try:
                while True:
                    message = decode(sock.recv(zmq.NOBLOCK))
                    latencies.append(time.perf_counter() - sent_at.pop(message[1]))
                    pending[sock] -= 1
                    if running:
                        send_one()
            except zmq.Again:
                pass
            if pending[sock] == 0:
                poller.unregister(sock)
    out.send((latencies, len(sent_at)))
    out.close()
    for sock in sockets:
        sock.close(0)
    context.term()


def hold_requests(address: str, count: int, out: Any) -> None:
    """One client sending ``count`` requests that the holding engines never answer."""
    import msgspec
    import zmq

    from megatron_coord.protocol import Headers

    encode = msgspec.msgpack.Encoder().encode
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(address)
    sock.send(encode([int(Headers.CONNECT)]))
    sock.recv()
    for i in range(count):
        sock.send(encode([int(Headers.SUBMIT_REQUEST), i, PROMPT, SAMPLING]))
    out.send(True)
    out.recv()  # hold the connection (and the requests) until told
    sock.close(0)
    context.term()


# ---------------------------------------------------------------------- phases


class Deployment:
    """A coordinator with ``replicas`` simulated engines over ``args.engine_procs`` processes."""

    def __init__(self, args: argparse.Namespace, replicas: int, policy: str, hold: bool = False):
        ctx = multiprocessing.get_context("spawn")
        self.ctx = ctx
        parent, child = ctx.Pipe()
        ready = ctx.Event()
        self.coordinator = ctx.Process(
            target=coordinator_main, args=(child, ready, replicas, policy), daemon=True
        )
        self.coordinator.start()
        child.close()
        self.address = parent.recv()
        self.stop = ctx.Event()
        procs = max(1, min(args.engine_procs, replicas))
        self.engines = [
            ctx.Process(
                target=engine_host,
                args=(
                    self.address,
                    list(range(p, replicas, procs)),
                    args.engine_delay_ms / 1e3,
                    hold,
                    args.reply_batch,
                    self.stop,
                ),
                daemon=True,
            )
            for p in range(procs)
        ]
        for engine in self.engines:
            engine.start()
        if not ready.wait(120):
            self.close()
            raise RuntimeError("the engines did not register")
        time.sleep(1.5)  # every engine's first heartbeat is in

    @property
    def pid(self) -> int:
        return self.coordinator.pid

    def close(self) -> None:
        self.stop.set()
        for engine in self.engines:
            engine.join(10)
            if engine.is_alive():
                engine.kill()
        self.coordinator.kill()
        self.coordinator.join()


def run_phase(args: argparse.Namespace, deployment: Deployment, clients: int) -> dict[str, Any]:
    """``clients`` connected clients keeping ``args.window`` requests in flight for
    ``args.duration`` s."""
    ctx = deployment.ctx
    # A ZMQ socket costs a process about 3 descriptors: at most 2,500 clients per process.
    procs = max(1, min(args.client_procs, clients), -(-clients // 2500))
    go = ctx.Event()
    rss_before = rss_bytes(deployment.pid)
    hosts, pipes, connected = [], [], []
    for p in range(procs):
        share = clients // procs + (1 if p < clients % procs else 0)
        parent, child = ctx.Pipe(duplex=False)
        event = ctx.Event()
        host = ctx.Process(
            target=client_host,
            args=(deployment.address, share, args.window // procs, args.duration, event, go, child),
            daemon=True,
        )
        host.start()
        child.close()
        hosts.append(host)
        pipes.append(parent)
        connected.append(event)
    deadline = time.monotonic() + 180
    for event, host in zip(connected, hosts, strict=True):
        while not event.wait(0.5):
            if not host.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the clients did not connect")
    rss_connected = rss_bytes(deployment.pid)
    # Idle first: what the connected peers cost per second with no request (heartbeats, ZMTP
    # pings of every connection, liveness), to tell it apart from the cost per request.
    idle0, idle_t0 = cpu_ns(deployment.pid), time.monotonic()
    time.sleep(args.idle)
    idle_share = (cpu_ns(deployment.pid) - idle0) / 1e9 / (time.monotonic() - idle_t0)
    cpu0, t0 = cpu_ns(deployment.pid), time.monotonic()
    main0 = cpu_ns(deployment.pid, main_only=True)
    woke0 = wakeups(deployment.pid)
    go.set()
    results = [pipe.recv() for pipe in pipes]
    elapsed = time.monotonic() - t0
    cpu1 = cpu_ns(deployment.pid)
    main1 = cpu_ns(deployment.pid, main_only=True)
    woke1 = wakeups(deployment.pid)
    for host in hosts:
        host.join(30)
    latencies = [lat for got, _ in results for lat in got]
    lost = sum(missing for _, missing in results)
    answered = len(latencies)
    return {
        "clients": clients,
        "answered": answered,
        "unanswered": lost,
        "throughput_per_s": round(answered / args.duration, 1),
        "coordinator_cpu_us_per_request": round((cpu1 - cpu0) / 1e3 / max(1, answered), 2),
        "coordinator_main_thread_us_per_request": round(
            (main1 - main0) / 1e3 / max(1, answered), 2
        ),
        # Requests per wake-up of the loop: the fewer, the more each pays of a wake-up's cost.
        "requests_per_wakeup": round(answered / max(1, woke1 - woke0), 2),
        "coordinator_cpu_share": round((cpu1 - cpu0) / 1e9 / elapsed, 3),
        "coordinator_idle_cpu_share": round(idle_share, 4),
        # Net of the idle cost over the same time: what the requests themselves cost.
        "coordinator_net_cpu_us_per_request": round(
            ((cpu1 - cpu0) / 1e3 - idle_share * elapsed * 1e6) / max(1, answered), 2
        ),
        "rss_per_client_kib": round((rss_connected - rss_before) / 1024 / clients, 2),
        **percentiles(latencies, 3),
    }


def memory_in_flight(args: argparse.Namespace) -> dict[str, Any]:
    """Coordinator RSS per 10,000 requests in flight (engines that hold every request)."""
    deployment = Deployment(args, 4, "least_loaded", hold=True)
    try:
        before = rss_bytes(deployment.pid)
        parent, child = deployment.ctx.Pipe()
        holder = deployment.ctx.Process(
            target=hold_requests, args=(deployment.address, args.in_flight, child), daemon=True
        )
        holder.start()
        parent.recv()
        time.sleep(2.0)  # let the coordinator take every request in
        after = rss_bytes(deployment.pid)
        parent.send(True)
        holder.join(30)
    finally:
        deployment.close()
    return {
        "requests_in_flight": args.in_flight,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_mib_per_10k_in_flight": round((after - before) / 2**20 * 10_000 / args.in_flight, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per phase")
    parser.add_argument(
        "--window",
        type=int,
        default=10,
        help="requests kept in flight (default 10: at most one per client at any client count)",
    )
    parser.add_argument(
        "--reply-batch",
        type=int,
        default=1,
        help="records per ENGINE_REPLY at most (default 1: as many messages per request at 4 "
        "replicas as at 256)",
    )
    parser.add_argument("--policies", default="round_robin,least_loaded")
    parser.add_argument("--replicas", default="4,64,256")
    parser.add_argument("--clients", default="10,1000,10000")
    parser.add_argument("--engine-procs", type=int, default=2)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--engine-delay-ms", type=float, default=0.0)
    parser.add_argument("--in-flight", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="grids run (median kept)")
    parser.add_argument("--idle", type=float, default=1.5, help="idle seconds measured first")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--routing-only",
        action="store_true",
        help="measure only the policies alone and add them to an existing scale_out.json",
    )
    args = parser.parse_args()
    if args.routing_only:
        add_routing_alone(args)
        return

    samples: dict[tuple, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):  # whole grids one after the other: noise hits all alike
        for policy in args.policies.split(","):
            for replicas in [int(r) for r in args.replicas.split(",")]:
                deployment = Deployment(args, replicas, policy)
                try:
                    for clients in [int(c) for c in args.clients.split(",")]:
                        phase = run_phase(args, deployment, clients)
                        phase.update(policy=policy, replicas=replicas)
                        print(phase, file=sys.stderr, flush=True)
                        samples.setdefault((policy, replicas, clients), []).append(phase)
                finally:
                    deployment.close()
    runs = [median_run(phases) for phases in samples.values()]
    replica_counts = [int(r) for r in args.replicas.split(",")]
    routing_alone = policy_cost(replica_counts, args.policies.split(","))
    out = {
        "benchmark": "scale_out",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {k: v for k, v in vars(args).items() if k != "no_write"},
        "runs": runs,
        "ratios": ratios(runs),
        "routing_policy_alone_us_per_request": routing_alone,
        "memory": memory_in_flight(args),
    }
    if args.no_write:
        print(out)
    else:
        write_results(os.path.join(RESULTS, "scale_out.json"), out)


def policy_cost(replicas: list[int], policies: list[str], rounds: int = 5) -> dict[str, Any]:
    """The routing policy alone, in this process: microseconds per request of choose +
    on_submit + on_finish with ``2 x replicas`` requests in flight (best of ``rounds``, the
    replica counts interleaved so noise hits all alike)."""
    import collections

    from megatron_coord.coordinator.routing import make_policy

    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for name in policies:
            for n in replicas:
                policy = make_policy(name, [b"engine-%d" % i for i in range(n)])
                inflight: collections.deque = collections.deque()
                count = 20_000
                start = time.perf_counter()
                for request_id in range(count):
                    engine = policy.choose()
                    if policy.tracks_load:
                        policy.on_submit(engine, request_id, PROMPT, 4 + request_id % 61)
                    inflight.append((engine, request_id))
                    if len(inflight) > 2 * n:
                        done, done_id = inflight.popleft()
                        if policy.tracks_load:
                            policy.on_finish(done, done_id, 4)
                took = (time.perf_counter() - start) / count * 1e6
                key = (name, n)
                best[key] = min(best.get(key, took), took)
    return {name: {str(n): round(best[(name, n)], 3) for n in replicas} for name in policies}


def add_routing_alone(args: argparse.Namespace) -> None:
    """``--routing-only``: the policy micro-measurement, merged into the results file."""
    import json

    path = os.path.join(RESULTS, "scale_out.json")
    with open(path) as f:
        out = json.load(f)
    replica_counts = [int(r) for r in args.replicas.split(",")]
    out["routing_policy_alone_us_per_request"] = policy_cost(
        replica_counts, args.policies.split(",")
    )
    write_results(path, out)


def median_run(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median CPU per request, with every repeat's CPU per request."""
    ordered = sorted(phases, key=lambda p: p["coordinator_cpu_us_per_request"])
    run = dict(ordered[len(ordered) // 2])
    run["cpu_us_per_request_repeats"] = [p["coordinator_cpu_us_per_request"] for p in phases]
    return run


def ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per policy: CPU per request at the most replicas / the fewest (at the fewest clients),
    and at the most clients / the fewest (at the fewest replicas): the targets are <= 1.25."""
    out: dict[str, Any] = {}
    for policy in sorted({r["policy"] for r in runs}):
        mine = [r for r in runs if r["policy"] == policy]
        rmin, rmax = min(r["replicas"] for r in mine), max(r["replicas"] for r in mine)
        cmin, cmax = min(r["clients"] for r in mine), max(r["clients"] for r in mine)

        for key, tag in (
            ("coordinator_cpu_us_per_request", "cpu"),
            ("coordinator_net_cpu_us_per_request", "net_cpu"),
        ):

            def cpu(replicas: int, clients: int, mine: list = mine, key: str = key) -> float:
                return next(
                    r[key] for r in mine if r["replicas"] == replicas and r["clients"] == clients
                )

            out.setdefault(policy, {}).update(
                {
                    f"{tag}_{rmax}_vs_{rmin}_replicas": round(cpu(rmax, cmin) / cpu(rmin, cmin), 3),
                    f"{tag}_{cmax}_vs_{cmin}_clients": round(cpu(rmin, cmax) / cpu(rmin, cmin), 3),
                    f"{tag}_{rmax}r_{cmax}c_vs_{rmin}r_{cmin}c": round(
                        cpu(rmax, cmax) / cpu(rmin, cmin), 3
                    ),
                }
            )
    return out


if __name__ == "__main__":
    main()
