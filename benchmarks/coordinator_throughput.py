"""Coordinator throughput and latency: megatron_coord vs Megatron-core 0.16.1 and 0.19.2 vs a
libzmq proxy.

Every system gets the same fake engines (separate processes that answer each drained batch of
requests in one ENGINE_REPLY) and the same load clients (separate processes, raw DEALER
sockets, each keeping ``--window`` requests in flight). Megatron-core 0.19.2 speaks another
protocol, so its coordinator gets clients and engines of that protocol (fake_engine_019, with
records serialized once by 0.19's own classes); ours is measured with the same 0.19 peers too
(``megatron_coord_019_peers``), beside its run with 0.16's. The libzmq proxy (``zmq.proxy`` between
a ROUTER for clients and a DEALER for engines, no Python per message) is the ceiling. A second
measurement sends one request at a time through our InferenceClient, coordinator and an
instant engine (and through Megatron's client and coordinator when importable).

Run: ``python benchmarks/coordinator_throughput.py [--duration 5]``. Prints JSON and writes it
to benchmarks/results/coordinator_throughput.json. ``--routing least_loaded,prefix_aware
--repeat 3 --ours-only`` compares routing policies instead: ours once per policy, the runs
interleaved, each policy's runs and median side by side (the fake engines register as
Megatron's, so prefix_aware indexes its own decisions; every client repeats one prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import time
from typing import Any

import msgspec
import zmq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS, percentiles, start_coordinator, write_results  # noqa: E402

from megatron_coord.coordinator import DataParallelInferenceCoordinator  # noqa: E402
from megatron_coord.sampling_params import SamplingParams  # noqa: E402
from megatron_coord.testing import megatron019  # noqa: E402
from megatron_coord.testing.fake_engine import ByteTokenizer, FakeEngine, recv_ready, spawn  # noqa: E402

# What a load client sends, by protocol: its CONNECT, and the first two bytes of a SUBMIT
# (a 4-element fixarray, then the header). None: the proxy, no handshake.
_CONNECT = {"0.16": [1], "0.19": [0]}
_SUBMIT_PREFIX = {"0.16": b"\x94\x03", "0.19": b"\x94\x14", None: b"\x94\x03"}

_encode = msgspec.msgpack.Encoder().encode
_reply_decoder = msgspec.msgpack.Decoder(tuple[int, int, msgspec.Raw])


# ---------------------------------------------------------------------- load client


def load_client(
    address: str,
    protocol: str | None,
    window: int,
    prompt_tokens: int,
    generate_tokens: int,
    start: Any,
    warmup: float,
    duration: float,
    results: Any,
    unique_tokens: int = 0,
) -> None:
    """Keep ``window`` requests in flight; report completions and latencies inside the window.

    ``unique_tokens``: the last that many prompt tokens differ per request (a shared prefix
    and a question of its own), else every request of the client repeats one prompt."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    if protocol is not None:
        sock.send(_encode(_CONNECT[protocol]))
        sock.recv()
    prefix = _SUBMIT_PREFIX[protocol]
    rng = random.Random(os.getpid())
    prompt = [rng.randrange(32, 127) for _ in range(prompt_tokens)]
    params = SamplingParams(num_tokens_to_generate=generate_tokens, top_k=1).serialize()
    params.pop("seed")
    params.pop("streaming_interval")  # Megatron's engines know only Megatron's fields
    tail = _encode(prompt) + _encode(params)  # the request body, encoded once
    encoded_params = _encode(params)
    shared = prompt[: prompt_tokens - unique_tokens]
    sent_at: dict[int, float] = {}
    now = time.perf_counter

    def submit(request_id: int) -> None:
        sent_at[request_id] = now()
        if unique_tokens:
            unique = [32 + (request_id * 7919 + i * 31) % 95 for i in range(unique_tokens)]
            body = _encode(shared + unique) + encoded_params
            sock.send(prefix + _encode(request_id) + body)
            return
        sock.send(prefix + _encode(request_id) + tail)

    start.wait()
    begin = now() + warmup
    end = begin + duration
    latencies: list[float] = []
    next_id = 0
    for _ in range(window):
        submit(next_id)
        next_id += 1
    while sent_at:
        for frame in recv_ready(sock):
            header, request_id, _ = _reply_decoder.decode(frame)
            t = now()
            started = sent_at.pop(request_id)
            if begin <= t < end:
                latencies.append(t - started)
            if t < end:
                submit(next_id)
                next_id += 1
    results.put(latencies)
    sock.close()
    context.term()


# ---------------------------------------------------------------------- systems


def megatron_entrypoint(*args: Any) -> None:
    """Megatron-core 0.16.1's own coordinator (imports torch; binds its host name)."""
    from megatron.core.inference.data_parallel_inference_coordinator import (
        DataParallelInferenceCoordinator as MegatronCoordinator,
    )

    MegatronCoordinator.entrypoint(*args)


def proxy_entrypoint(pipe: Any, ready: Any, engines: int, tokenizer: Any) -> None:
    """The ceiling: zmq.proxy between clients and engines, no Python per message."""
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.DEALER)
    for sock in (frontend, backend):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    frontend.bind_to_random_port("tcp://127.0.0.1")
    backend.bind_to_random_port("tcp://127.0.0.1")
    pipe.send(
        (
            frontend.getsockopt_string(zmq.LAST_ENDPOINT),
            backend.getsockopt_string(zmq.LAST_ENDPOINT),
        )
    )
    ready.set()
    zmq.proxy(frontend, backend)


def proxy_engine(address: str) -> None:
    """A fake engine behind the proxy: same records, replies straight to each client."""
    engine = FakeEngine.__new__(FakeEngine)
    engine.rank, engine.megatron_style = 0, True
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    decode = msgspec.msgpack.Decoder().decode
    tokenizer = ByteTokenizer()
    while True:
        batch = [sock.recv_multipart()]
        try:
            while True:
                batch.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            pass
        for client, payload in batch:
            _, client_request_id, prompt, params = decode(payload)
            record = engine.record(client_request_id, prompt, params)
            request = record["requests"][0]
            request["generated_text"] = tokenizer.detokenize(request["generated_tokens"])
            sock.send_multipart([client, _encode([4, client_request_id, record])])


def start_megatron_019(engines: int) -> tuple[str, list[Any]]:
    """Megatron-core 0.19.2's coordinator and engines of its protocol, each under 0.19's path."""
    env = megatron019.environment()
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_megatron019_coordinator.py")
    coordinator = subprocess.Popen(
        [sys.executable, runner, str(engines)], env=env, stdout=subprocess.PIPE, text=True
    )
    address = coordinator.stdout.readline().strip()
    procs = [coordinator, *spawn_019_engines(address, engines, env)]
    if coordinator.stdout.readline().strip() != "ready":
        stop_procs(procs)
        raise RuntimeError("megatron-core 0.19.2's coordinator did not become ready")
    return address, procs


def spawn_019_engines(address: str, engines: int, env: dict[str, str]) -> list[Any]:
    module = "megatron_coord.testing.fake_engine_019"
    return [
        subprocess.Popen(
            [sys.executable, "-m", module, address, "--rank", str(r), "--template"], env=env
        )
        for r in range(engines)
    ]


def ours_with_019_engines(*args: Any) -> None:
    """Our coordinator, its engines registering as Megatron-core 0.19's."""
    DataParallelInferenceCoordinator.entrypoint(*args, megatron_engines="0.19")


# system -> the protocol its clients speak (None: the proxy's raw frames)
PROTOCOLS = {
    "megatron_coord": "0.16",
    "megatron_core_0.16.1": "0.16",
    "megatron_coord_019_peers": "0.19",
    "megatron_core_0.19.2": "0.19",
    "zmq_proxy": None,
}


def start_system(name: str, engines: int) -> tuple[str, list[Any]]:
    """Start one system's coordinator (or proxy) and engines; returns (client address, procs)."""
    if name == "megatron_core_0.19.2":
        return start_megatron_019(engines)
    name, _, routing = name.partition(":")  # "megatron_coord:least_loaded": that policy
    target = {
        "megatron_coord": DataParallelInferenceCoordinator.entrypoint,
        "megatron_core_0.16.1": megatron_entrypoint,
        "megatron_coord_019_peers": ours_with_019_engines,
        "zmq_proxy": proxy_entrypoint,
    }[name]
    if routing:  # "prefix_aware:16": that policy with 16-token blocks
        routing, _, block = routing.partition(":")
        options = {"prefix_block_size": int(block)} if block else {}
        target = functools.partial(target, routing=routing, **options)
    address, coordinator, ready = start_coordinator(engines, target)
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = [coordinator]
    if name == "zmq_proxy":
        address, backend = address
        for _ in range(engines):
            procs.append(ctx.Process(target=proxy_engine, args=(backend,), daemon=True))
            procs[-1].start()
    elif name == "megatron_coord_019_peers":
        procs += spawn_019_engines(address, engines, megatron019.environment())
    else:
        procs += [spawn(address, rank, megatron_style=True) for rank in range(engines)]
    if not ready.wait(120):
        raise RuntimeError(f"{name} did not become ready")
    return address, procs


def stop_procs(procs: list[Any]) -> None:
    for proc in procs:
        if isinstance(proc, subprocess.Popen):
            proc.kill()
            proc.wait()
        else:
            proc.kill()
            proc.join()


def run_load(
    address: str,
    protocol: str | None,
    args: argparse.Namespace,
    procs: list[Any],
    cpu: list[float] | None = None,
) -> list:
    """Drive ``address`` with ``args.clients`` load clients released together; their latencies.

    ``procs`` (the system under test) are stopped with the clients, whatever happens.
    ``cpu``: gets the CPU seconds ``procs[0]`` spent in the measured window appended.
    """
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    load = (address, protocol, args.window, args.prompt_tokens, args.generate_tokens, start)
    clients = [
        ctx.Process(
            target=load_client,
            args=(*load, args.warmup, args.duration, results, getattr(args, "unique_tokens", 0)),
            daemon=True,
        )
        for _ in range(args.clients)
    ]
    try:
        for client in clients:
            client.start()
        time.sleep(1.0)  # let the clients import and connect before the clock starts
        start.set()
        if cpu is not None:
            time.sleep(args.warmup)
            cpu_before = _cpu_seconds(procs[0].pid)
            time.sleep(args.duration)
            cpu.append(_cpu_seconds(procs[0].pid) - cpu_before)
        latencies: list[float] = []
        for _ in clients:
            latencies += results.get(timeout=args.warmup + args.duration + 120)
        for client in clients:
            client.join(30)
    finally:
        stop_procs(clients + procs)
    return latencies


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_throughput(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Requests/s, latency percentiles and the coordinator's CPU time per request (the
    process the system starts first; the proxy's for zmq_proxy) under the windowed load."""
    address, procs = start_system(name, args.engines)
    cpu: list[float] = []
    latencies = run_load(address, PROTOCOLS[name.partition(":")[0]], args, procs, cpu)
    cpu_us = cpu[0] / max(1, len(latencies)) * 1e6
    return {
        "requests_per_s": len(latencies) / args.duration,
        "coordinator_cpu_us_per_request": cpu_us,
        **percentiles(latencies),
    }


# ---------------------------------------------------------------------- one request at a time


async def _sequential(client: Any, params: Any, prompt: list[int], count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await client.add_request(prompt, params)
        latencies.append(time.perf_counter() - started)
    return latencies


def measure_single(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Latency of one request at a time through a client, the coordinator and one engine."""
    address, procs = start_system(name, 1)
    prompt = list(range(32, 32 + 64)) * (args.prompt_tokens // 64 + 1)
    prompt = prompt[: args.prompt_tokens]
    try:
        if name == "megatron_coord":
            from megatron_coord.client import InferenceClient

            params = SamplingParams(num_tokens_to_generate=args.generate_tokens, top_k=1)
        else:
            from megatron.core.inference.inference_client import InferenceClient
            from megatron.core.inference.sampling_params import SamplingParams as MegatronParams

            params = MegatronParams(num_tokens_to_generate=args.generate_tokens, top_k=1)

        async def run() -> list[float]:
            client = InferenceClient(address)
            await client.start()
            await _sequential(client, params, prompt, args.single_warmup)
            latencies = await _sequential(client, params, prompt, args.single_requests)
            client.stop()
            return latencies

        latencies = asyncio.run(run())
    finally:
        stop_procs(procs)
    return {"requests": len(latencies), **percentiles(latencies)}


def megatron_available() -> bool:
    try:
        import megatron.core.inference.data_parallel_inference_coordinator  # noqa: F401
    except Exception:
        return False
    return True


def compare_routing(args: argparse.Namespace) -> dict[str, Any]:
    """Ours under each ``--routing`` policy, ``--repeat`` times, runs interleaved (so a slow
    patch of the machine hits every policy alike); medians and the ratio to the first."""
    routings = args.routing.split(",")
    runs: dict[str, list[dict[str, Any]]] = {routing: [] for routing in routings}
    for _ in range(args.repeat):
        for routing in routings:
            runs[routing].append(measure_throughput(f"megatron_coord:{routing}", args))
    out: dict[str, Any] = {}
    for routing, measured in runs.items():
        out[routing] = {"runs": measured}
        for key in ("requests_per_s", "coordinator_cpu_us_per_request"):
            values = sorted(run[key] for run in measured)
            out[routing][f"median_{key}"] = values[len(values) // 2]
    first = out[routings[0]]
    for routing in routings[1:]:
        for key in ("requests_per_s", "coordinator_cpu_us_per_request"):
            ratio = out[routing][f"median_{key}"] / first[f"median_{key}"]
            out[f"ratio_{key}_{routing}_over_{routings[0]}"] = ratio
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per system")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--window", type=int, default=64, help="requests in flight per client")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--generate-tokens", type=int, default=8)
    parser.add_argument(
        "--unique-tokens",
        type=int,
        default=0,
        help="the last N prompt tokens differ per request (default 0: each client repeats one)",
    )
    parser.add_argument("--single-requests", type=int, default=2000)
    parser.add_argument("--single-warmup", type=int, default=200)
    parser.add_argument("--skip-megatron", action="store_true")
    parser.add_argument(
        "--routing",
        default=None,
        help="comma-separated routing policies of ours to compare (with --ours-only; default "
        "least_loaded,prefix_aware; prefix_aware:16 sets its block size for Megatron's engines)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per policy (--routing)")
    parser.add_argument(
        "--ours-only", action="store_true", help="only compare --routing policies of ours"
    )
    parser.add_argument("--output", default=None, help="default: benchmarks/results/<name>.json")
    args = parser.parse_args()
    name = "coordinator_routing_cost" if args.ours_only else "coordinator_throughput"
    args.output = args.output or os.path.join(RESULTS, f"{name}.json")
    if args.ours_only:
        args.routing = args.routing or "least_loaded,prefix_aware"
        report = {
            "config": {k: v for k, v in vars(args).items() if k != "output"},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "routing": compare_routing(args),
        }
        write_results(args.output, report, indent=2)
        return
    if args.routing is not None:
        parser.error("--routing compares policies of ours: use it with --ours-only")

    systems = ["megatron_coord", "zmq_proxy"]
    if not args.skip_megatron and megatron_available():
        systems.insert(1, "megatron_core_0.16.1")
    if not args.skip_megatron and megatron019.installed():
        systems[2:2] = ["megatron_coord_019_peers", "megatron_core_0.19.2"]
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "throughput": {name: measure_throughput(name, args) for name in systems},
    }
    single = {"megatron_coord": measure_single("megatron_coord", args)}
    if "megatron_core_0.16.1" in systems:
        single["megatron_core_0.16.1"] = measure_single("megatron_core_0.16.1", args)
    report["single_request_latency"] = single
    ours = report["throughput"]["megatron_coord"]["requests_per_s"]
    if "megatron_core_0.16.1" in report["throughput"]:
        theirs = report["throughput"]["megatron_core_0.16.1"]["requests_per_s"]
        report["ratio_ours_over_megatron"] = ours / theirs
    if "megatron_core_0.19.2" in report["throughput"]:
        ours_019 = report["throughput"]["megatron_coord_019_peers"]["requests_per_s"]
        theirs_019 = report["throughput"]["megatron_core_0.19.2"]["requests_per_s"]
        report["ratio_ours_over_megatron_019"] = ours_019 / theirs_019
        report["ratio_ours_016_peers_over_megatron_019"] = ours / theirs_019
    report["ratio_ours_over_proxy"] = ours / report["throughput"]["zmq_proxy"]["requests_per_s"]
    write_results(args.output, report, indent=2)


if __name__ == "__main__":
    main()
