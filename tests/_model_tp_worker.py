"""torchrun worker for tests/test_model_tp.py: load each checkpoint at the launch's TP size
and save this rank's scenario logits to ``<out>/<checkpoint name>.rank<R>.pt``.

Usage: torchrun --nproc-per-node T tests/_model_tp_worker.py OUT_DIR TOKENS.pt CKPT_DIR...
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _model_scenario import run_scenario  # noqa: E402

from megatron_coord.models.checkpoint import load_model  # noqa: E402
from megatron_coord.parallel_state import initialize  # noqa: E402


def main() -> None:
    out_dir, tokens_path, *checkpoints = sys.argv[1:]
    torch.set_num_threads(1)  # two ranks share two cores
    state = initialize(int(os.environ["WORLD_SIZE"]))
    tokens = torch.load(tokens_path)
    for path in checkpoints:
        model = load_model(path, state)
        result = run_scenario(model, tokens)
        name = os.path.basename(os.path.normpath(path))
        payload = {
            "results": result,
            "vocab_part": model.layout.vocab_part,
            "embed_rows": model.embed_tokens.shape[0],
            "kv_heads_local": model.layout.kv_heads,
        }
        torch.save(payload, os.path.join(out_dir, f"{name}.rank{state.rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
