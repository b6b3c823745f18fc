"""HTTP front end throughput and latency over fake engines: what the OpenAI layer costs.

A coordinator and ``--replicas`` instant fake engines run as separate processes, the HTTP server
runs as its own process (``python -m megatron_coord.serving``), and load comes from
``--clients`` load processes, each keeping ``--window`` keep-alive HTTP/1.1 connections busy
with ``POST /v1/completions`` (a minimal raw-socket client, so the load generator costs little
next to the server). For reference the same load goes straight through ``InferenceClient`` (no
HTTP) in one process. Then one request at a time measures unary latency and streaming
time-to-first-token (through httpx).

``--http-workers 1,2`` (the default) runs the HTTP phases once per worker count, side by side
in one run against the same coordinator and engines: unary requests/s, and streamed tokens/s
with ``--streams`` (256) concurrent streams of ``--stream-tokens`` tokens each.

Run: ``python benchmarks/http_throughput.py [--duration 5]``. Prints JSON and writes it to
benchmarks/results/http_throughput.json. On a shared 2-core machine every process competes for
the same cores: read the numbers as relative, not as the server's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS, percentiles, start_coordinator  # noqa: E402

MODEL = "bench"


def _run_fast(coroutine: Any) -> Any:
    """Run a load generator's coroutine on uvloop where installed: the load processes share
    the cores with the server, so the cheaper they are, the more the server gets."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants, from /proc."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(process_cpu_s(int(child)) for child in f.read().split())
    except OSError:
        pass
    return total


def request_bytes(prompt_tokens: int, max_tokens: int) -> bytes:
    body = json.dumps(
        {"model": MODEL, "prompt": list(range(1, prompt_tokens + 1)), "max_tokens": max_tokens}
    ).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def one_connection(
    port: int, payload: bytes, stop_at: float, latencies: list[float], errors: list[int]
) -> None:
    """Send requests back to back on one keep-alive connection until ``stop_at``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(status)
    finally:
        writer.close()


def load_process(
    port: int, window: int, prompt_tokens: int, max_tokens: int, duration: float, out: Any
) -> None:
    """One load process: ``window`` connections for ``duration`` seconds; sends its latencies."""

    async def run() -> tuple[list[float], list[int]]:
        latencies: list[float] = []
        errors: list[int] = []
        stop_at = time.perf_counter() + duration
        payload = request_bytes(prompt_tokens, max_tokens)
        await asyncio.gather(
            *(one_connection(port, payload, stop_at, latencies, errors) for _ in range(window))
        )
        return latencies, errors

    out.send(_run_fast(run()))
    out.close()


def stream_bytes(prompt_tokens: int, max_tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": list(range(1, prompt_tokens + 1)),
            "max_tokens": max_tokens,
            "stream": True,
        }
    ).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def one_stream_connection(
    port: int, payload: bytes, stop_at: float, done: list[tuple[float, int]], errors: list[int]
) -> None:
    """Streamed requests back to back on one keep-alive connection until ``stop_at``: each is
    read to its last chunk; records (latency, server-sent events with text) per stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            if int(head.split(b" ", 2)[1]) != 200:
                errors.append(int(head.split(b" ", 2)[1]))
                return
            body = b""
            while not body.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of the response
                body += await reader.read(65536)
                if reader.at_eof():
                    raise ConnectionError("the stream was cut")
            done.append((time.perf_counter() - start, body.count(b'data: {"')))
    finally:
        writer.close()


def stream_process(
    port: int, window: int, prompt_tokens: int, max_tokens: int, duration: float, out: Any
) -> None:
    """One load process of ``window`` concurrent streams for ``duration`` seconds."""

    async def run() -> tuple[list[tuple[float, int]], list[int]]:
        done: list[tuple[float, int]] = []
        errors: list[int] = []
        stop_at = time.perf_counter() + duration
        payload = stream_bytes(prompt_tokens, max_tokens)
        await asyncio.gather(
            *(one_stream_connection(port, payload, stop_at, done, errors) for _ in range(window))
        )
        return done, errors

    out.send(_run_fast(run()))
    out.close()


def _gather(target: Any, args: argparse.Namespace, port: int, window: int, tokens: int) -> list:
    """Run ``target`` in ``args.clients`` load processes; their results."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for _ in range(args.clients):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=target,
            args=(port, window, args.prompt_tokens, tokens, args.duration, child),
        )
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    results = [pipe.recv() for pipe in pipes]
    for proc in procs:
        proc.join()
    return results


def stream_load(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """``args.streams`` concurrent SSE streams: generated tokens/s delivered to the clients."""
    window = max(1, args.streams // args.clients)
    results = _gather(stream_process, args, port, window, args.stream_tokens)
    done = [d for got, _ in results for d in got]
    errors = sum(len(e) for _, e in results)
    events = [n for _, n in done]
    return {
        "concurrent_streams": window * args.clients,
        "tokens_per_stream": args.stream_tokens,
        "streams": len(done),
        "tokens_per_s": round(len(done) * args.stream_tokens / args.duration, 1),
        "events_per_stream_mean": round(sum(events) / max(1, len(events)), 2),
        "errors": errors,
        **percentiles([t for t, _ in done], 3),
    }


def http_load(args: argparse.Namespace, port: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for _ in range(args.clients):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=load_process,
            args=(port, args.window, args.prompt_tokens, args.max_tokens, args.duration, child),
        )
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    latencies: list[float] = []
    errors: list[int] = []
    for pipe in pipes:
        got_latencies, got_errors = pipe.recv()
        latencies += got_latencies
        errors += got_errors
    for proc in procs:
        proc.join()
    return {
        "requests_per_s": round(len(latencies) / args.duration, 1),
        "requests": len(latencies),
        "errors": len(errors),
        **percentiles(latencies, 3),
    }


async def direct_load(args: argparse.Namespace, address: str) -> dict[str, Any]:
    """The same load through InferenceClient, no HTTP: the floor the HTTP layer adds to."""
    from megatron_coord.client import InferenceClient
    from megatron_coord.sampling_params import SamplingParams

    client = InferenceClient(address)
    await client.start()
    params = SamplingParams(num_tokens_to_generate=args.max_tokens)
    prompt = list(range(1, args.prompt_tokens + 1))
    latencies: list[float] = []
    stop_at = time.perf_counter() + args.duration

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await client.add_request(prompt, params)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(args.window * args.clients)))
    client.stop()
    return {
        "requests_per_s": round(len(latencies) / args.duration, 1),
        "requests": len(latencies),
        **percentiles(latencies, 3),
    }


def single_request_latency(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One request at a time: unary latency, and time to the first streamed chunk."""
    import httpx

    body = {"model": MODEL, "prompt": "hello there", "max_tokens": args.max_tokens}
    unary, ttft = [], []
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(args.single_requests):
            start = time.perf_counter()
            http.post("/v1/completions", json=body).raise_for_status()
            unary.append(time.perf_counter() - start)
        for _ in range(args.single_requests):
            start = time.perf_counter()
            first = None
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - start
            ttft.append(first)
    return {"unary": percentiles(unary, 3), "stream_ttft": percentiles(ttft, 3)}


def wait_healthy(url: str, server: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the HTTP server exited")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the HTTP server did not become healthy")


def start_http_server(address: str, workers: int) -> tuple[str, Any, int]:
    """``python -m megatron_coord.serving --http-workers N`` as its own process; (url, stop,
    its pid)."""
    from megatron_coord.testing.fault_harness import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "megatron_coord.serving", "--coordinator-address", address]
        + ["--port", str(port), "--model-name", MODEL, "--log-level", "error"]
        + ["--http-workers", str(workers)]
    )

    def stop() -> None:
        server.terminate()
        server.wait(30)

    try:
        wait_healthy(url, server)
    except BaseException:
        stop()
        raise
    return url, stop, server.pid


def start_fake(args: argparse.Namespace) -> tuple[str, str, Any]:
    """Coordinator + fake engines, each their own process; returns a stopper."""
    from megatron_coord.testing.fake_engine import spawn

    address, coordinator, ready = start_coordinator(args.replicas)
    engines = [spawn(address, rank) for rank in range(args.replicas)]

    def stop() -> None:
        for engine in engines:
            engine.kill()
            engine.wait()
        coordinator.kill()
        coordinator.join()

    if not ready.wait(60):
        stop()
        raise RuntimeError("the fake engines did not register")
    return "", address, stop


def start_launch(args: argparse.Namespace) -> tuple[str, str, Any]:
    """``torchrun launch/serve.py --http-port 0``: real engines on the default model."""
    import tempfile

    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.replicas),
        "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        os.path.join(root, "launch", "serve.py"), "--http-port", "0",
        "--served-model-name", MODEL, "--max-batch-size", str(args.max_batch_size),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    found: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while len(found) < 2:
        if launch.poll() is not None or time.monotonic() > deadline:
            launch.kill()
            raise RuntimeError("serve.py did not start:\n" + pathlib.Path(log.name).read_text())
        for line in pathlib.Path(log.name).read_text().splitlines():
            for key, prefix in (("url", "OpenAI-compatible API at "), ("addr", "coordinator ")):
                if line.startswith(prefix):
                    found[key] = line.split()[3]
        time.sleep(0.1)
    url = found["url"].removesuffix("/v1")

    def stop() -> None:
        from megatron_coord.client import InferenceClient

        async def stop_engines() -> None:
            client = InferenceClient(found["addr"])
            await client.start()
            await asyncio.wait_for(client.stop_engines(), 60)
            client.stop()

        try:
            asyncio.run(stop_engines())
            launch.wait(60)
        finally:
            if launch.poll() is None:
                launch.kill()
            os.unlink(log.name)

    try:
        wait_healthy(url, launch)
    except BaseException:
        stop()
        raise
    return url, found["addr"], stop


def measure_http(args: argparse.Namespace, address: str, workers: int) -> dict[str, Any]:
    """One HTTP server with ``workers`` workers: unary load, streaming load, single requests;
    with the CPU time the server's processes used per unary request (steadier than req/s on a
    shared machine)."""
    url, stop_http, pid = start_http_server(address, workers)
    try:
        port = int(url.rsplit(":", 1)[1])
        cpu = process_cpu_s(pid)
        unary = http_load(args, port)
        unary["server_cpu_ms_per_request"] = round(
            (process_cpu_s(pid) - cpu) * 1e3 / max(1, unary["requests"]), 4
        )
        return {
            "unary": unary,
            "stream": stream_load(args, port),
            "single_request": single_request_latency(url, args),
        }
    finally:
        stop_http()


def fake_run(args: argparse.Namespace) -> dict[str, Any]:
    """Fake engines: every HTTP worker count in turn (``--repeat`` rounds, interleaved so
    machine noise hits all alike), then the direct client, in one run."""
    _, address, stop = start_fake(args)
    counts = [int(w) for w in args.http_workers.split(",")]
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(args.repeat):
            rounds.append({str(w): measure_http(args, address, w) for w in counts})
        direct = asyncio.run(direct_load(args, address))
    finally:
        stop()
    # Per worker count: the round with the best unary throughput (the least disturbed).
    by_workers = {
        str(w): max((r[str(w)] for r in rounds), key=lambda m: m["unary"]["requests_per_s"])
        for w in counts
    }
    first = by_workers[str(counts[0])]
    result = {
        "benchmark": "http_throughput",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {k: v for k, v in vars(args).items() if k != "no_write"},
        # The first worker count's numbers under the names earlier runs used.
        "http_completions": first["unary"],
        "direct_inference_client": direct,
        "single_request": first["single_request"],
        "http_workers": by_workers,
        "rounds": [
            {
                w: {
                    "unary_rps": m["unary"]["requests_per_s"],
                    "stream_tps": m["stream"]["tokens_per_s"],
                }
                for w, m in r.items()
            }
            for r in rounds
        ],
    }
    for run in by_workers.values():
        run["unary_vs_first"] = round(
            run["unary"]["requests_per_s"] / first["unary"]["requests_per_s"], 2
        )
        run["stream_vs_first"] = round(
            run["stream"]["tokens_per_s"] / first["stream"]["tokens_per_s"], 2
        )
        run["unary_vs_direct"] = round(run["unary"]["requests_per_s"] / direct["requests_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load phase")
    parser.add_argument(
        "--engines",
        choices=["fake", "launch"],
        default="fake",
        help="instant fake engines (default: measures the HTTP layer), or a real torchrun "
        "launch of launch/serve.py on the default model",
    )
    parser.add_argument("--replicas", type=int, default=2, help="engines (data-parallel ranks)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="--engines launch only")
    parser.add_argument("--clients", type=int, default=1, help="load processes")
    parser.add_argument("--window", type=int, default=32, help="connections per load process")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--single-requests", type=int, default=200)
    parser.add_argument(
        "--http-workers",
        default="1,2",
        help="comma-separated HTTP worker counts, measured one after the other in this run "
        "(fake engines only; default 1,2)",
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds over the worker counts (best one kept)"
    )
    parser.add_argument("--streams", type=int, default=256, help="concurrent SSE streams")
    parser.add_argument("--stream-tokens", type=int, default=16, help="tokens per stream")
    parser.add_argument("--no-write", action="store_true", help="do not write results/")
    args = parser.parse_args()

    if args.engines == "launch":
        url, address, stop = start_launch(args)
        try:
            result = {
                "benchmark": "http_throughput",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "config": {k: v for k, v in vars(args).items() if k != "no_write"},
                "http_completions": http_load(args, int(url.rsplit(":", 1)[1])),
                "direct_inference_client": asyncio.run(direct_load(args, address)),
                "single_request": single_request_latency(url, args),
            }
        finally:
            stop()
    else:
        result = fake_run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        name = "http_throughput.json" if args.engines == "fake" else "http_throughput_launch.json"
        with open(os.path.join(RESULTS, name), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
