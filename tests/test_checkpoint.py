"""Checkpoint loading: each TP rank reads only its shard, and gets exactly the right slice;
clear errors for broken checkpoints (the embedded default model: test_default_model.py)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from _model_scenario import SMALL, save_hf_checkpoint

from megatron_coord.models import checkpoint
from megatron_coord.models.checkpoint import load_model
from megatron_coord.parallel_state import ParallelState, single_process_state


def _tp_state(tp: int, tp_rank: int) -> ParallelState:
    return ParallelState(tp_rank, tp, tp, tp_rank, 0, 1, None, 0, "gloo", torch.device("cpu"))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("untied"))
    hf = save_hf_checkpoint(path, seed=3, tie=False, max_shard_size="40KB")
    return path, {k: v.detach().clone() for k, v in hf.state_dict().items()}


def test_rank_gets_exactly_its_shard(untied):
    path, hf = untied
    model = load_model(path, _tp_state(2, 1))  # loading needs no collectives
    hd = SMALL["head_dim"]
    emb = hf["model.embed_tokens.weight"]
    # Rows 51..100 of the vocabulary, then one zero pad row (101 -> 102).
    assert torch.equal(model.embed_tokens[:50], emb[51:])
    assert torch.equal(model.embed_tokens[50], torch.zeros(SMALL["hidden_size"]))
    assert torch.equal(model.lm_head[:50], hf["lm_head.weight"][51:])
    attn = "model.layers.1.self_attn."
    expected_qkv = torch.cat(
        [
            hf[attn + "q_proj.weight"][2 * hd : 4 * hd],  # heads 2, 3
            hf[attn + "k_proj.weight"][hd : 2 * hd],  # their KV head 1
            hf[attn + "v_proj.weight"][hd : 2 * hd],
        ]
    )
    assert torch.equal(model.layers[1].self_attn.qkv_proj, expected_qkv)
    assert torch.equal(model.layers[1].self_attn.o_proj, hf[attn + "o_proj.weight"][:, 2 * hd :])
    mlp = "model.layers.1.mlp."
    assert torch.equal(
        model.layers[1].mlp.gate_up_proj,
        torch.cat([hf[mlp + "gate_proj.weight"][48:], hf[mlp + "up_proj.weight"][48:]]),
    )
    assert torch.equal(model.layers[1].mlp.down_proj, hf[mlp + "down_proj.weight"][:, 48:])
    assert torch.equal(
        model.layers[1].post_attention_layernorm.weight,
        hf["model.layers.1.post_attention_layernorm.weight"],
    )
    assert torch.equal(model.norm.weight, hf["model.norm.weight"])


def test_rank_reads_only_its_slices(untied, monkeypatch):
    reads = []
    real_read = checkpoint._Reader.read

    def spy(self, name, shape, dim=None, lo=0, hi=0):
        tensor = real_read(self, name, shape, dim, lo, hi)
        reads.append((name, tuple(shape), tuple(tensor.shape)))
        return tensor

    monkeypatch.setattr(checkpoint._Reader, "read", spy)
    load_model(untied[0], _tp_state(2, 0))
    matrices = [r for r in reads if len(r[1]) == 2]
    assert len(matrices) == 2 + 7 * SMALL["num_hidden_layers"]
    for name, full, got in matrices:
        assert got[0] * got[1] * 2 <= full[0] * full[1] + got[1], (name, full, got)


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path: str, **changes) -> None:
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        d = json.load(f)
    d.update(changes)
    with open(config_path, "w") as f:
        json.dump(d, f)


def test_missing_files_are_clear_errors(untied, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), single_process_state())
    path = _copy(untied[0], tmp_path / "noweights")
    for name in os.listdir(path):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(os.path.join(path, name))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(path, single_process_state())


def test_truncated_or_missing_shards_are_clear_errors(untied, tmp_path):
    path = _copy(untied[0], tmp_path / "truncated")
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    assert len(shards) > 1  # the fixture is sharded, so an index names each file
    victim = os.path.join(path, shards[-1])
    os.truncate(victim, os.path.getsize(victim) - 8)
    with pytest.raises(ValueError, match=f"{shards[-1]} is not a readable safetensors file"):
        load_model(path, single_process_state())
    os.remove(victim)
    with pytest.raises(FileNotFoundError, match=f"shard .*{shards[-1]}.* is missing"):
        load_model(path, single_process_state())


def test_shape_mismatch_names_the_tensor(untied, tmp_path):
    path = _copy(untied[0], tmp_path / "wrong")
    _edit_config(path, intermediate_size=48)
    with pytest.raises(ValueError, match="mlp.*has shape"):
        load_model(path, single_process_state())


def test_missing_lm_head_without_tying_is_refused(tmp_path):
    path = str(tmp_path / "tied")
    save_hf_checkpoint(path, seed=4, tie=True)
    _edit_config(path, tie_word_embeddings=False)
    with pytest.raises(KeyError, match="lm_head"):
        load_model(path, single_process_state())


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(tmp_path), single_process_state())


def test_bfloat16_checkpoint_loads_into_float32(tmp_path):
    path = str(tmp_path / "bf16")
    hf = save_hf_checkpoint(path, seed=5, tie=True)
    hf.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    model = load_model(path, _tp_state(2, 0))
    assert model.embed_tokens.dtype == torch.float32
    emb = hf.model.embed_tokens.weight.detach()
    assert torch.equal(model.embed_tokens[:51], emb[:51].float())
    assert model.lm_head is model.embed_tokens
