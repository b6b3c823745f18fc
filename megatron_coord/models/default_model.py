"""The embedded default model: a small seeded-random Llama with the GPT-2 tokenizer.

It is written once as a real Hugging Face checkpoint (config, safetensors weights, tokenizer)
under ``$MEGATRON_COORD_CACHE`` and then loaded through the same path as any user checkpoint.

Every rank of every launch may call :func:`default_checkpoint_dir` at the same moment, on one
node or on several sharing a file system, so creation is guarded three ways:

- one writer: an exclusive ``flock`` on a lock file beside the directory, so the others wait
  for it instead of racing it (the kernel drops the lock of a writer that dies);
- the weights are written with safetensors directly, not ``save_pretrained``, which writes no
  weights on a rank other than 0 once a torch.distributed process group exists;
- the new directory is built under a temporary name, checked for every file the loader needs,
  and only then renamed into place, so the final name never holds a partial checkpoint.

An existing directory that is incomplete or corrupt is never repaired silently: it raises
:class:`IncompleteCheckpointError` naming the path to delete.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .checkpoint import read_config, weight_files

# Bump when the default model's recipe changes: the cache directory name carries it.
DEFAULT_RECIPE_VERSION = 1
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 50257,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}
DEFAULT_SEED = 0
# What load_tokenizer reads besides config and weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_TMP_PREFIX = ".tmp-default-llama-"


class IncompleteCheckpointError(RuntimeError):
    """A cached checkpoint directory lacks a file the loader needs, or one is unreadable."""


def cache_root() -> str:
    """``$MEGATRON_COORD_CACHE`` or ``~/.cache/megatron_coord``."""
    root = os.environ.get("MEGATRON_COORD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_coord"
    )
    return os.path.abspath(root)


def default_checkpoint_path() -> str:
    """Where the default model lives (whether or not it has been written yet)."""
    return os.path.join(cache_root(), f"megatron_coord-default-llama-v{DEFAULT_RECIPE_VERSION}")


def checkpoint_problems(path: str) -> list[str]:
    """What keeps ``path`` from loading as a checkpoint with its tokenizer; empty when complete.

    Parses config.json and every safetensors header (safetensors rejects a truncated file), and
    requires the tokenizer files to exist and be non-empty."""
    problems: list[str] = []
    for check in (read_config, weight_files):
        try:
            check(path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            problems.append(str(e))
    for name in TOKENIZER_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) == 0:
            problems.append(f"{name} is missing or empty")
    return problems


def default_checkpoint_dir() -> str:
    """Return the default model's checkpoint directory, writing it first if absent.

    Safe to call from any number of processes at once; see the module docstring."""
    final = default_checkpoint_path()
    if os.path.isdir(final):
        _require_complete(final)
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with _exclusive_lock(final + ".lock"):
        if os.path.isdir(final):  # another process wrote it while this one waited
            _require_complete(final)
            return final
        _remove_leftovers(os.path.dirname(final))
        tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=os.path.dirname(final))
        try:
            write_default_checkpoint(tmp)
            problems = checkpoint_problems(tmp)
            if problems:
                raise IncompleteCheckpointError(
                    "writing the default model produced an incomplete checkpoint: "
                    + "; ".join(problems)
                )
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _require_complete(path: str) -> None:
    problems = checkpoint_problems(path)
    if problems:
        raise IncompleteCheckpointError(
            f"the cached default model at {path} is incomplete or corrupt ("
            + "; ".join(problems)
            + f"). Delete that directory (rm -rf '{path}') and run again to rewrite it."
        )


@contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if absent) for the block."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(root: str) -> None:
    """Delete temporary directories of writers that died (only the lock holder writes)."""
    for leftover in glob.glob(os.path.join(root, _TMP_PREFIX + "*")):
        shutil.rmtree(leftover, ignore_errors=True)


def write_default_checkpoint(path: str) -> None:
    """Save the seeded-random default Llama and the GPT-2 tokenizer as an HF checkpoint.

    The files are those ``save_pretrained`` writes (config.json, generation_config.json,
    model.safetensors with ``format: pt`` metadata and without the tied ``lm_head.weight``),
    written by this process whatever its torch.distributed rank."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..tokenizer import gpt2_tokenizer

    d = dict(DEFAULT_MODEL_CONFIG)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEFAULT_SEED)
        model = LlamaForCausalLM(LlamaConfig(**d))
    tensors = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    gpt2_tokenizer().hf_tokenizer.save_pretrained(path)
