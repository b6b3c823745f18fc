"""Loading Hugging Face Llama checkpoints into the tensor-parallel model, shard by shard.

Each rank opens the safetensors file(s) with ``safe_open`` and reads, through ``get_slice``,
only the rows or columns its shard needs, so a TP=T job reads each weight about once in total
rather than T times. Single-file (``model.safetensors``) and sharded
(``model.safetensors.index.json``) checkpoints are both supported.

``load_weights`` reads a checkpoint into a served model's parameters in place (a weight
update), checking every tensor's shape from the file headers before the first copy. Which rows
or columns a rank reads is ``shard_plan.py``'s, shared with the weight-update receiver.

The embedded default model is written as such a checkpoint by ``default_model.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from ..parallel_state import ParallelState
from .config import ModelConfig
from .llama import LlamaModel
from .shard_plan import OUTPUT_LAYER, ShardPart, copy_into, shard_plan

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(path: str) -> ModelConfig:
    """Read and validate ``config.json`` of a checkpoint directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    with open(config_path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    return ModelConfig.from_hf_dict(d)


def weight_files(path: str) -> dict[str, str]:
    """Map each tensor name to the safetensors file that holds it.

    Every file's header is read, so a missing shard or a truncated file (safetensors checks
    that the header covers the file exactly) is a clear error here rather than mid-load."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f).get("weight_map")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{index_path} is not a valid index: {e}") from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        for file in set(files.values()):
            _tensor_names(file)
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return dict.fromkeys(_tensor_names(single), single)
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in checkpoint directory {path!r}")


def _tensor_names(file: str) -> list[str]:
    """The tensor names in one safetensors file's header; ValueError if it is unreadable."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint shard {file!r} is missing")
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e


class _Reader:
    """Reads row or column ranges of named tensors, opening each file once."""

    def __init__(self, files: dict[str, str], stack: ExitStack) -> None:
        self.files = files
        self.stack = stack
        self.handles: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.files

    def _slice(self, name: str) -> Any:
        if name not in self.files:
            raise KeyError(f"checkpoint lacks tensor {name!r}")
        file = self.files[name]
        if file not in self.handles:
            from safetensors import safe_open

            self.handles[file] = self.stack.enter_context(safe_open(file, framework="pt"))
        return self.handles[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of ``name``, from its file's header (no data is read)."""
        return tuple(self._slice(name).get_shape())

    def read(
        self, name: str, shape: tuple[int, ...], dim: int | None = None, lo: int = 0, hi: int = 0
    ) -> torch.Tensor:
        """Read ``name`` (whose full shape must be ``shape``), or ``[lo:hi]`` along ``dim``."""
        sl = self._slice(name)
        actual = tuple(sl.get_shape())
        if actual != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {actual}, config implies {tuple(shape)}")
        if dim is None:
            return sl[:]
        if dim == 0:
            return sl[lo:hi]
        return sl[:, lo:hi]


def _shares_embedding(config: ModelConfig, reader: _Reader) -> bool:
    """True when the output layer is the embedding (tied and no separate lm_head saved)."""
    if reader.has(OUTPUT_LAYER):
        return False
    if not config.tie_word_embeddings:
        raise KeyError("checkpoint lacks lm_head.weight and tie_word_embeddings is false")
    return True


def _read_part(reader: _Reader, part: ShardPart) -> torch.Tensor:
    """The rows or columns of a checkpoint tensor that one part of a local parameter needs."""
    if part.dim is None:
        return reader.read(part.name, part.shape)
    return reader.read(part.name, part.shape, part.dim, part.lo, part.hi)


def fill_parameter(
    name: str,
    param: torch.Tensor,
    parts: list[ShardPart],
    read: Callable[[ShardPart], torch.Tensor],
) -> None:
    """Copy a local parameter's parts (``read(part)``: that part's tensor) into it in place;
    rows no part covers (the vocabulary's padding) are zeroed."""
    end = 0
    for part in parts:
        tensor = read(part)
        target = param if part.dim == 1 else param[part.row : part.row + tensor.shape[0]]
        if tensor.shape != target.shape:
            raise ValueError(
                f"{name}: shard shape {tuple(tensor.shape)} != {tuple(target.shape)}"
            )  # a bug here, not in the checkpoint
        copy_into(target, tensor)
        end = max(end, part.row + part.rows)
    if end < param.shape[0]:
        param[end:].zero_()


def _copy_shards(model: LlamaModel, reader: _Reader, tied: bool) -> None:
    """Read this rank's shard of every parameter from the checkpoint, into the model."""
    params = dict(model.named_parameters())
    plan = shard_plan(model.config, model.layout, tied)
    if set(plan) != set(params):
        raise RuntimeError(
            f"loader/model mismatch: {sorted(set(plan) ^ set(params))}"
        )  # a bug here, not in the checkpoint
    with torch.no_grad():
        for name, parts in plan.items():
            fill_parameter(name, params[name], parts, lambda part: _read_part(reader, part))


def load_model(path: str, state: ParallelState, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """Build the model for this rank and fill it with its shard of the checkpoint at ``path``."""
    config = read_config(path)
    model = LlamaModel(config, state, dtype=dtype)
    with ExitStack() as stack:
        reader = _Reader(weight_files(path), stack)
        tied = _shares_embedding(config, reader)
        if tied:
            # One tensor, not two copies of the vocabulary; the output layer's (transposed)
            # layout wins, as the output matmul costs far more than the embedding lookup.
            model.embed_tokens = model.lm_head
        _copy_shards(model, reader, tied)
    return model.eval()


# What a new checkpoint for a served model must keep: every field but the token ids.
_ARCHITECTURE = tuple(
    f for f in ModelConfig.__dataclass_fields__ if f not in ("bos_token_id", "eos_token_id")
)


def _problems(model: LlamaModel, config: ModelConfig, reader: _Reader, tied: bool) -> list[str]:
    """What keeps a checkpoint from replacing a served model's weights (empty: nothing)."""
    served = model.config
    changed = [f for f in _ARCHITECTURE if getattr(config, f) != getattr(served, f)]
    if changed:
        differences = (
            f"{f} ({getattr(config, f)!r}, served {getattr(served, f)!r})" for f in changed
        )
        return ["its config.json differs from the served model's in " + ", ".join(differences)]
    problems = []
    if tied and reader.has(OUTPUT_LAYER):
        problems.append(
            "the served model ties its output layer to the embedding, the checkpoint has its "
            "own lm_head.weight"
        )
    plan = shard_plan(served, model.layout, tied)
    for name, shape in sorted({(p.name, p.shape) for parts in plan.values() for p in parts}):
        if not reader.has(name):
            problems.append(f"tensor {name!r} is missing")
            continue
        actual = reader.shape(name)
        if actual != shape:
            problems.append(f"tensor {name!r} has shape {actual}, the served model needs {shape}")
    return problems


def load_weights(
    model: LlamaModel, path: str, before_copy: Callable[[list[str]], None] | None = None
) -> None:
    """Replace a loaded model's weights by this rank's shard of the checkpoint at ``path``, in
    place (a weight update: the parameters keep their tensors, so nothing else changes).

    Every tensor's presence and shape is checked from the files' headers before the first copy;
    ``before_copy(problems)`` is called then (on every rank: a TP group agrees there, raising if
    any rank found a problem); without it, problems raise ValueError here. Once it returns,
    the copy may fail only on I/O, leaving the weights mixed."""
    config = read_config(path)
    tied = model.embed_tokens is model.lm_head
    with ExitStack() as stack:
        reader = _Reader(weight_files(path), stack)
        problems = _problems(model, config, reader, tied)
        if before_copy is not None:
            before_copy(problems)
        elif problems:
            raise ValueError(f"checkpoint {path!r}: " + "; ".join(problems))
        _copy_shards(model, reader, tied)
