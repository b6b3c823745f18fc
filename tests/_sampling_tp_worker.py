"""torchrun worker for test_prompt_log_probs.py: the sampling workload at TP=2, every group of
requests sent through the real TP broadcast, with the prefix cache on and off; saves this
rank's results to ``<out>/rank<R>.json``.

Usage: torchrun --nproc-per-node 2 tests/_sampling_tp_worker.py CKPT_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _sampling_workload import BLOCK, run_workload  # noqa: E402

from megatron_coord.engine import InferenceEngine  # noqa: E402
from megatron_coord.engine.tp_broadcast import TPBroadcaster  # noqa: E402
from megatron_coord.models.checkpoint import load_model  # noqa: E402
from megatron_coord.parallel_state import initialize  # noqa: E402


def main() -> None:
    checkpoint, out_dir = sys.argv[1:]
    torch.set_num_threads(1)  # two ranks share two cores
    state = initialize(int(os.environ["WORLD_SIZE"]))
    model = load_model(checkpoint, state)
    broadcaster = TPBroadcaster(state)
    results = {}
    for name, caching in (("on", True), ("off", False)):
        engine = InferenceEngine(
            model, max_batch_size=4, max_seq_len=64, prefix_caching=caching, kv_block_size=BLOCK
        )
        results[name] = run_workload(engine, broadcaster.exchange, state.is_tp_coordinator)
    with open(os.path.join(out_dir, f"rank{state.rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
