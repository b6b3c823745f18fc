"""Checkpoint loading: each TP rank reads only its shard, and gets exactly the right slice;
clear errors for broken checkpoints; the embedded default checkpoint is written once,
deterministically and atomically even when several processes race to write it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _model_scenario import SMALL, save_hf_checkpoint

from megatron_coord import checkpoint
from megatron_coord.checkpoint import default_checkpoint_dir, load_model
from megatron_coord.parallel_state import ParallelState, single_process_state
from megatron_coord.tokenizer import load_tokenizer


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


# ---- the embedded default -------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MEGATRON_COORD_CACHE")
    os.environ["MEGATRON_COORD_CACHE"] = str(root)
    try:
        yield default_checkpoint_dir()
    finally:
        if old is None:
            del os.environ["MEGATRON_COORD_CACHE"]
        else:
            os.environ["MEGATRON_COORD_CACHE"] = old


def test_default_checkpoint_is_the_specified_model(default_dir):
    assert "megatron_coord" in os.path.basename(default_dir)
    assert default_dir.startswith(os.environ["MEGATRON_COORD_CACHE"])
    config = checkpoint.read_config(default_dir)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (50257, 256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 32)
    assert (config.intermediate_size, config.max_position_embeddings) == (688, 1024)
    assert config.eos_token_id == 50256
    tokenizer = load_tokenizer(default_dir)
    assert tokenizer.tokenize("Hello world") == [15496, 995]  # real GPT-2 BPE
    assert tokenizer.eod == 50256
    model = load_model(default_dir, single_process_state())
    cache = model.allocate_kv_cache(2, 16)
    logits = model(
        torch.tensor([tokenizer.tokenize("Hello world")]),
        torch.tensor([0]),
        torch.tensor([1]),
        cache,
    )
    assert logits.shape == (1, 50257) and torch.isfinite(logits).all()
    assert logits.std() > 0  # random weights were written, not zeros


def test_default_checkpoint_is_written_once(default_dir):
    weights = os.path.join(default_dir, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert default_checkpoint_dir() == default_dir
    assert os.stat(weights).st_mtime_ns == before


def test_concurrent_writers_agree_and_are_deterministic(default_dir, tmp_path):
    root = tmp_path / "race"
    code = "from megatron_coord.checkpoint import default_checkpoint_dir; print(default_checkpoint_dir())"
    env = dict(os.environ, MEGATRON_COORD_CACHE=str(root), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1] and os.path.isdir(outputs[0])
    assert os.listdir(root) == [os.path.basename(outputs[0])]  # no temporary dirs left
    # Seeded recipe: the racers wrote byte-identical weights to the fixture's.
    with open(os.path.join(outputs[0], "model.safetensors"), "rb") as f:
        raced = f.read()
    with open(os.path.join(default_dir, "model.safetensors"), "rb") as f:
        assert raced == f.read()


def test_losing_the_rename_race_keeps_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_COORD_CACHE", str(tmp_path))
    final = os.path.join(
        str(tmp_path), f"megatron_coord-default-llama-v{checkpoint.DEFAULT_RECIPE_VERSION}"
    )

    def write_while_another_wins(path):
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write("loser")
        os.makedirs(final)  # another rank finished first
        with open(os.path.join(final, "config.json"), "w") as f:
            f.write("winner")

    monkeypatch.setattr(checkpoint, "write_default_checkpoint", write_while_another_wins)
    assert default_checkpoint_dir() == final
    with open(os.path.join(final, "config.json")) as f:
        assert f.read() == "winner"
    assert os.listdir(tmp_path) == [os.path.basename(final)]


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_COORD_CACHE", str(tmp_path))

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_default_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        default_checkpoint_dir()
    assert os.listdir(tmp_path) == []


def test_bfloat16_checkpoint_loads_into_float32(tmp_path):
    path = str(tmp_path / "bf16")
    hf = save_hf_checkpoint(path, seed=5, tie=True)
    hf.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    model = load_model(path, _tp_state(2, 0))
    assert model.embed_tokens.dtype == torch.float32
    emb = hf.model.embed_tokens.weight.detach()
    assert torch.equal(model.embed_tokens[:51], emb[:51].float())
    assert model.lm_head is model.embed_tokens
