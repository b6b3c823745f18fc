"""Cost per step of the TP broadcast (gloo here; NCCL on GPU), measured under torchrun.

    python benchmarks/tp_broadcast.py [--nproc 2] [--steps 2000]

Re-launches itself with torchrun (world = --nproc, one TP group; with --nproc 1, as on a
single GPU, the source side runs over the 1-rank world group). For an empty decode step, a
step with 8 new 128-token prompts and one with 64 new 1024-token prompts it times
``TPBroadcaster.exchange`` (pack + broadcast + unpack) and, as a floor, a bare broadcast of the
same number of words. Rank 0 prints JSON and writes benchmarks/results/tp_broadcast.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import RESULTS, write_results  # noqa: E402


def _inputs(n_requests: int, n_tokens: int):
    from megatron_coord.engine.tp_broadcast import NewRequest, StepInputs
    from megatron_coord.sampling_params import SamplingParams

    params = SamplingParams(top_k=1, num_tokens_to_generate=64)
    reqs = [
        NewRequest(i, [(i * 7 + j) % 50257 for j in range(n_tokens)], params, i)
        for i in range(n_requests)
    ]
    return StepInputs([], reqs)


def worker(steps: int) -> None:
    import torch
    import torch.distributed as dist

    from megatron_coord import parallel_state
    from megatron_coord.engine.tp_broadcast import TPBroadcaster, pack

    torch.set_num_threads(1)
    state = parallel_state.initialize(tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
    broadcaster = TPBroadcaster(state)
    if state.world_size == 1:
        # One GPU: time pack + device copy + a collective over the 1-rank world group.
        broadcaster.enabled = True
    sync = (lambda: torch.cuda.synchronize()) if state.device.type == "cuda" else (lambda: None)
    results = {}
    for name, (n, t, k) in {
        "decode_step_empty": (0, 0, steps),
        "8x128_prompts": (8, 128, max(10, steps // 10)),
        "64x1024_prompts": (64, 1024, max(5, steps // 100)),
    }.items():
        inputs = _inputs(n, t)
        words = pack(inputs).numel()
        raw = torch.zeros(
            max(words, broadcaster.head_words), dtype=torch.int64, device=broadcaster.device
        )
        timings = {}
        for label, fn in {
            "exchange_us": lambda i=inputs: broadcaster.exchange(
                i if state.is_tp_coordinator else None
            ),
            "bare_broadcast_us": lambda r=raw: dist.broadcast(
                r, src=state.tp_src_rank, group=state.tp_group
            ),
        }.items():
            for _ in range(3):
                fn()
            sync()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            timings[label] = (time.perf_counter() - start) / k * 1e6
        results[name] = {"words": words, "steps": k, **timings}
    if state.rank == 0:
        out = {
            "benchmark": "tp_broadcast",
            "backend": state.backend,
            "world_size": state.world_size,
            "tensor_parallel_size": state.tensor_parallel_size,
            "device": str(state.device),
            "unit": "microseconds per step (rank 0)",
            "cases": results,
        }
        write_results(os.path.join(RESULTS, "tp_broadcast.json"), out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args.steps)
        return
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
        "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        os.path.abspath(__file__), "--steps", str(args.steps),
    ]  # fmt: skip
    sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))


if __name__ == "__main__":
    main()
