"""The embedded default model: the specified checkpoint, written once by exactly one writer
however many processes ask at once (torch.distributed ranks included), never left half-written,
and a clear error naming the directory to delete when a cached copy is incomplete or corrupt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from megatron_coord.models import default_model
from megatron_coord.models.checkpoint import load_model, read_config
from megatron_coord.models.default_model import (
    IncompleteCheckpointError,
    checkpoint_problems,
    default_checkpoint_dir,
    default_checkpoint_path,
)
from megatron_coord.parallel_state import single_process_state
from megatron_coord.tokenizer import load_tokenizer

NEEDED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGATRON_COORD_CACHE", str(root))
        yield default_checkpoint_dir()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty private cache; returns the path the default model will have in it."""
    monkeypatch.setenv("MEGATRON_COORD_CACHE", str(tmp_path))
    return default_checkpoint_path()


def _dirs(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))


def test_default_checkpoint_is_the_specified_model(default_dir):
    assert "megatron_coord" in os.path.basename(default_dir)
    assert default_dir.startswith(os.environ["MEGATRON_COORD_CACHE"])
    assert set(os.listdir(default_dir)) >= NEEDED and checkpoint_problems(default_dir) == []
    config = read_config(default_dir)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (50257, 256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 32)
    assert (config.intermediate_size, config.max_position_embeddings) == (688, 1024)
    assert config.eos_token_id == 50256
    tokenizer = load_tokenizer(default_dir)
    assert tokenizer.tokenize("Hello world") == [15496, 995]  # real GPT-2 BPE
    assert tokenizer.eod == 50256
    model = load_model(default_dir, single_process_state())
    cache = model.allocate_kv_cache(2, 16)
    prompt = tokenizer.tokenize("Hello world")
    logits = model(torch.tensor([prompt]), torch.tensor([0]), torch.tensor([0]), cache)
    assert logits.shape == (1, 50257) and torch.isfinite(logits).all()
    assert logits.std() > 0  # random weights were written, not zeros


def test_default_checkpoint_is_a_real_hugging_face_checkpoint(default_dir):
    """Written without save_pretrained, it still loads in transformers with tied weights, and
    both loaders compute the same next-token logits."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    prompt = load_tokenizer(default_dir).tokenize("The quick brown fox")
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1]
    ours = load_model(default_dir, single_process_state())
    kv = ours.allocate_kv_cache(1, 16)
    got = ours(torch.tensor([prompt]), torch.tensor([0]), torch.tensor([0]), kv)[0]
    torch.testing.assert_close(got[: expected.numel()], expected, atol=1e-4, rtol=1e-4)


def test_default_checkpoint_is_written_once(default_dir):
    weights = os.path.join(default_dir, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert default_checkpoint_dir() == default_dir
    assert os.stat(weights).st_mtime_ns == before


def test_four_concurrent_writers_agree_and_are_deterministic(default_dir, tmp_path):
    root = tmp_path / "race"
    code = "from megatron_coord.models.default_model import default_checkpoint_dir as d; print(d())"
    env = dict(os.environ, MEGATRON_COORD_CACHE=str(root), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert len(set(outputs)) == 1 and checkpoint_problems(outputs[0]) == []
    assert _dirs(root) == [os.path.basename(outputs[0])]  # no temporary dirs left
    # Seeded recipe: the racers wrote byte-identical weights to the fixture's.
    with open(os.path.join(outputs[0], "model.safetensors"), "rb") as f:
        raced = f.read()
    with open(os.path.join(default_dir, "model.safetensors"), "rb") as f:
        assert raced == f.read()


_RANK_ONE_WRITES = """
import json, os, sys, torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
if rank == 1:  # save_pretrained would write no weights here: this rank is not rank 0
    from megatron_coord.models.default_model import default_checkpoint_dir
    print(json.dumps(os.listdir(default_checkpoint_dir())))
dist.barrier()
dist.destroy_process_group()
"""


def test_a_non_zero_rank_of_a_process_group_writes_a_complete_checkpoint(tmp_path):
    env = dict(os.environ, MEGATRON_COORD_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    store = str(tmp_path / "store")
    cmd = [sys.executable, "-c", _RANK_ONE_WRITES]
    procs = [
        subprocess.Popen([*cmd, str(r), store], env=env, stdout=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert set(json.loads(outputs[1])) >= NEEDED  # what rank 1 found in the directory
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGATRON_COORD_CACHE", str(tmp_path / "cache"))
        assert checkpoint_problems(default_checkpoint_path()) == []


def test_a_waiting_process_takes_the_writers_directory(default_dir, cache, monkeypatch):
    """While one process holds the lock, another waits for it instead of writing a copy."""
    writes: list[str] = []
    monkeypatch.setattr(default_model, "write_default_checkpoint", writes.append)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(default_checkpoint_dir())
        except Exception as e:  # reported through results
            results.append(e)

    waiter = threading.Thread(target=call)
    with default_model._exclusive_lock(cache + ".lock"):
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # blocked on the lock: the directory does not exist yet
        shutil.copytree(default_dir, cache)  # the lock holder finishes its write
    waiter.join(30)
    assert results == [cache] and writes == []


def test_an_incomplete_directory_is_a_clear_error_naming_it(default_dir, cache):
    """The directory the old rename race left behind: only the tokenizer, no config or weights."""
    os.makedirs(cache)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(default_dir, name), cache)
    with pytest.raises(IncompleteCheckpointError, match="config.json") as err:
        default_checkpoint_dir()
    assert f"rm -rf '{cache}'" in str(err.value) and "model.safetensors" in str(err.value)


def test_a_corrupt_weights_file_is_a_clear_error(default_dir, cache):
    shutil.copytree(default_dir, cache)
    weights = os.path.join(cache, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(IncompleteCheckpointError, match="not a readable safetensors file"):
        default_checkpoint_dir()


def test_an_incomplete_write_is_never_renamed_into_place(cache, monkeypatch):
    def tokenizer_only(path: str) -> None:
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write("{}")

    monkeypatch.setattr(default_model, "write_default_checkpoint", tokenizer_only)
    with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint"):
        default_checkpoint_dir()
    assert _dirs(os.path.dirname(cache)) == []


def test_failed_write_leaves_nothing_behind(cache, monkeypatch):
    def broken(path: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(default_model, "write_default_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        default_checkpoint_dir()
    assert _dirs(os.path.dirname(cache)) == []


def test_leftovers_of_a_dead_writer_are_removed(default_dir, cache, monkeypatch):
    root = os.path.dirname(cache)
    os.makedirs(os.path.join(root, ".tmp-default-llama-deadbeef"))
    monkeypatch.setattr(
        default_model, "write_default_checkpoint", lambda p: shutil.copytree(
            default_dir, p, dirs_exist_ok=True
        )
    )  # fmt: skip
    assert default_checkpoint_dir() == cache
    assert _dirs(root) == [os.path.basename(cache)]
