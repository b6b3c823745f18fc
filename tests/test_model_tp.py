"""TP=2 parity: a real ``torchrun --nproc-per-node 2`` gloo job loads transformers-saved
checkpoints shard by shard and must match ``LlamaForCausalLM`` within 1e-4, on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _model_scenario import SMALL, max_error, reference_logits, save_hf_checkpoint, scenario_tokens

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4


@pytest.mark.torchrun
def test_tp2_matches_transformers(tmp_path):
    # Two checkpoints in one launch: tied + sharded (index.json), untied + single file.
    ckpts = {
        "tied_sharded": save_hf_checkpoint(
            str(tmp_path / "tied_sharded"), seed=1, tie=True, max_shard_size="40KB"
        ),
        "untied_single": save_hf_checkpoint(str(tmp_path / "untied_single"), seed=2, tie=False),
    }
    assert (tmp_path / "tied_sharded" / "model.safetensors.index.json").exists()
    tokens = scenario_tokens()
    torch.save(tokens, tmp_path / "tokens.pt")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.join(HERE, "_model_tp_worker.py"),
        str(out),
        str(tmp_path / "tokens.pt"),
        *(str(tmp_path / name) for name in ckpts),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name, hf_model in ckpts.items():
        ref = reference_logits(hf_model, tokens)
        ranks = [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)]
        # The shards really are halves: 101 tokens pad to 102 -> 51 rows; 2 KV heads -> 1.
        for payload in ranks:
            assert payload["vocab_part"] == 51 and payload["embed_rows"] == 51
            assert payload["kv_heads_local"] == SMALL["num_key_value_heads"] // 2
        for case in ("prefill_all", "chunked", "decode"):
            err = max_error(ranks[0]["results"][case], ref)
            assert err < TOL, f"{name}/{case}: max |diff| {err}"
            assert ranks[0]["results"][case][1] == ranks[1]["results"][case][1]
            # Every rank must return the same full-vocabulary logits.
            assert torch.equal(ranks[0]["results"][case][0], ranks[1]["results"][case][0])
            assert ranks[0]["results"][case][0].shape[-1] == SMALL["vocab_size"]
