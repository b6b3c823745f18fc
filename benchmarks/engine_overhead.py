"""End-to-end tokens/s through coordinator + engine vs the same engine stepped in process.

    python benchmarks/engine_overhead.py [--requests 32] [--prompt-len 32] [--tokens 64]
        [--max-batch-size 8] [--threads 1] [--repeat 5] [--model DIR]

Both sides run the identical workload (token-id prompts, greedy, no early stop) on the same
model (default: the embedded default Llama) with the same number of torch threads:

* in process: InferenceEngine.step() in a loop until every request finished;
* end to end: ``torchrun --nproc-per-node 1 launch/serve.py`` (coordinator process + engine
  server), driven by an InferenceClient that submits every request at once and waits for all
  results. Startup is excluded: the clock starts after the client connected.

The two alternate (one in-process run, one end-to-end run, --repeat times, after one warm-up
each), so load from other processes hits both alike. Overhead = 1 - e2e / in-process tokens/s,
from the medians and from the best runs (target: <= 10%). A third measurement isolates the
engine side of coordination: EngineServer.run_once minus the engine's step, per step, against a
bare ROUTER in process. Prints JSON and
writes benchmarks/results/engine_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import RESULTS, write_results  # noqa: E402

ROOT = os.path.dirname(HERE)


def workload(args) -> tuple[list[list[int]], dict]:
    rng = random.Random(0)
    prompts = [[rng.randrange(50000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    params = {"top_k": 1, "num_tokens_to_generate": args.tokens, "termination_id": -1}
    return prompts, params


def in_process_runner(args, model_path: str):
    """Load the model once; return a function doing one in-process run."""
    import torch

    from megatron_coord.engine import InferenceEngine
    from megatron_coord.engine.tp_broadcast import NewRequest
    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.parallel_state import single_process_state
    from megatron_coord.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    model = load_model(model_path, single_process_state())
    prompts, params = workload(args)

    def run_once() -> dict:
        engine = InferenceEngine(model, max_batch_size=args.max_batch_size)
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(NewRequest(i, prompt, SamplingParams(**params), 0))
        tokens = steps = 0
        while engine.has_work:
            result = engine.step()
            steps += 1
            tokens += sum(len(r["requests"][0]["generated_tokens"]) for r in result.finished)
        elapsed = time.perf_counter() - start
        return {
            "tokens": tokens,
            "seconds": elapsed,
            "steps": steps,
            "tokens_per_s": tokens / elapsed,
        }

    return run_once


async def _drive(address: str, args, stop: bool) -> dict:
    from megatron_coord.client import InferenceClient

    prompts, params = workload(args)
    client = InferenceClient(address)
    await client.start()
    start = time.perf_counter()
    records = await asyncio.gather(*(client.add_request(p, params) for p in prompts))
    elapsed = time.perf_counter() - start
    tokens = sum(len(r["requests"][0]["generated_tokens"]) for r in records)
    if stop:
        await client.stop_engines()
    client.stop()
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def server_loop_cost(args, model_path: str, steps: int = 200) -> dict:
    """Engine-side cost of coordination per step: EngineServer.run_once minus the engine's
    step (compute_step + commit_step; the step guard between them counts as overhead).

    The server talks to a bare ROUTER in this process (the coordinator's socket type), so the
    numbers hold the poll, TP exchange, signal handling and replies, and nothing of the
    coordinator process or the OS scheduling between processes.
    """
    import torch
    import zmq

    from megatron_coord.engine import InferenceEngine
    from megatron_coord.engine.server import EngineServer
    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.parallel_state import single_process_state
    from megatron_coord.protocol import Headers, encode

    torch.set_num_threads(args.threads)
    model = load_model(model_path, single_process_state())
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    engine = InferenceEngine(model, max_batch_size=args.max_batch_size)
    server = EngineServer(engine, single_process_state(), f"tcp://127.0.0.1:{port}")
    identity, _ = router.recv_multipart()  # REGISTER
    prompts, params = workload(args)
    params = {**params, "num_tokens_to_generate": steps + 20}
    for i, prompt in enumerate(prompts[: args.max_batch_size]):
        router.send_multipart([identity, encode([int(Headers.SUBMIT_REQUEST), i, prompt, params])])
    while engine.num_requests < args.max_batch_size:
        server.run_once()
    inner = 0.0

    def timed(part):  # engine.step is compute_step + commit_step (the server guards between)
        def run(*args):
            nonlocal inner
            start = time.perf_counter()
            result = part(*args)
            inner += time.perf_counter() - start
            return result

        return run

    engine.compute_step = timed(engine.compute_step)
    engine.commit_step = timed(engine.commit_step)
    start = time.perf_counter()
    for _ in range(steps):
        server.run_once()
    total = time.perf_counter() - start
    server.close()
    router.close(0)
    context.term()
    return {
        "steps": steps,
        "step_us": inner / steps * 1e6,
        "loop_overhead_us": (total - inner) / steps * 1e6,
        "loop_overhead_fraction": (total - inner) / total,
    }


def summarize(runs: list[dict]) -> dict:
    rates = sorted(r["tokens_per_s"] for r in runs)
    return {
        "tokens": runs[0]["tokens"],
        "runs": len(runs),
        "best_tokens_per_s": rates[-1],
        "median_tokens_per_s": rates[len(rates) // 2],
        "all_tokens_per_s": [r["tokens_per_s"] for r in runs],
    }


def alternate(args, local_run) -> tuple[list[dict], list[dict]]:
    """Start serve.py, then alternate in-process and end-to-end runs (fair on a noisy host)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
        "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        os.path.join(ROOT, "launch", "serve.py"), "--max-batch-size", str(args.max_batch_size),
    ]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        address = None
        for line in proc.stdout:
            if line.startswith("coordinator listening at "):
                address = line.split()[-1]
                break
        if address is None:
            raise RuntimeError("serve.py did not start")
        local_run()  # warm-up of both sides, not counted
        asyncio.run(_drive(address, args, stop=False))
        local, e2e = [], []
        for i in range(args.repeat):
            local.append(local_run())
            e2e.append(asyncio.run(_drive(address, args, stop=i == args.repeat - 1)))
        proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return local, e2e


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    from megatron_coord.models.default_model import default_checkpoint_dir

    model_path = args.model or default_checkpoint_dir()
    local_runs, e2e_runs = alternate(args, in_process_runner(args, model_path))
    local, e2e = summarize(local_runs), summarize(e2e_runs)
    loop = server_loop_cost(args, model_path)
    assert local["tokens"] == e2e["tokens"] == args.requests * args.tokens
    out = {
        "benchmark": "engine_overhead",
        "workload": {
            k: getattr(args, k)
            for k in ("requests", "prompt_len", "tokens", "max_batch_size", "threads", "repeat")
        },
        "model": model_path,
        "in_process": local,
        "end_to_end": e2e,
        "overhead_median": 1 - e2e["median_tokens_per_s"] / local["median_tokens_per_s"],
        "overhead_best": 1 - e2e["best_tokens_per_s"] / local["best_tokens_per_s"],
        "engine_server_loop": loop,
    }
    write_results(os.path.join(RESULTS, "engine_overhead.json"), out)


if __name__ == "__main__":
    main()
