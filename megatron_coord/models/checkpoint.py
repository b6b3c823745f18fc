"""Loading Hugging Face Llama checkpoints into the tensor-parallel model, shard by shard.

Each rank opens the safetensors file(s) with ``safe_open`` and reads, through ``get_slice``,
only the rows or columns its shard needs, so a TP=T job reads each weight about once in total
rather than T times. Single-file (``model.safetensors``) and sharded
(``model.safetensors.index.json``) checkpoints are both supported.

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
from .config import ModelConfig, TPLayout
from .llama import LlamaModel

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
    if reader.has("lm_head.weight"):
        return False
    if not config.tie_word_embeddings:
        raise KeyError("checkpoint lacks lm_head.weight and tie_word_embeddings is false")
    return True


def _shard_sources(
    config: ModelConfig, lay: TPLayout, reader: _Reader
) -> dict[str, Callable[[], torch.Tensor]]:
    """For each local parameter name, a function that reads its shard from the checkpoint."""
    c = config
    hd, hidden = c.head_dim, c.hidden_size
    sources: dict[str, Callable[[], torch.Tensor]] = {}

    def rows(name: str, full: tuple[int, int], lo: int, hi: int) -> Callable[[], torch.Tensor]:
        return lambda: reader.read(name, full, 0, lo, hi)

    def cols(name: str, full: tuple[int, int], lo: int, hi: int) -> Callable[[], torch.Tensor]:
        return lambda: reader.read(name, full, 1, lo, hi)

    def cat(*parts: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: torch.cat([p() for p in parts], dim=0)

    def vocab(name: str) -> Callable[[], torch.Tensor]:
        lo = lay.vocab_start
        hi = min(lo + lay.vocab_part, c.vocab_size)

        def load() -> torch.Tensor:
            shard = torch.zeros(lay.vocab_part, hidden)
            if hi > lo:
                shard[: hi - lo] = reader.read(name, (c.vocab_size, hidden), 0, lo, hi)
            return shard

        return load

    sources["embed_tokens"] = vocab("model.embed_tokens.weight")
    if not _shares_embedding(config, reader):
        sources["lm_head"] = vocab("lm_head.weight")
    sources["norm.weight"] = lambda: reader.read("model.norm.weight", (hidden,))

    q0, k0 = lay.rank * lay.heads * hd, lay.rank * lay.kv_heads * hd
    nq, nk = lay.heads * hd, lay.kv_heads * hd
    f0, nf = lay.rank * lay.intermediate, lay.intermediate
    for i in range(c.num_hidden_layers):
        p, hf = f"layers.{i}.", f"model.layers.{i}."
        attn = hf + "self_attn."
        sources[p + "self_attn.qkv_proj"] = cat(
            rows(attn + "q_proj.weight", (c.num_attention_heads * hd, hidden), q0, q0 + nq),
            rows(attn + "k_proj.weight", (c.num_key_value_heads * hd, hidden), k0, k0 + nk),
            rows(attn + "v_proj.weight", (c.num_key_value_heads * hd, hidden), k0, k0 + nk),
        )
        sources[p + "self_attn.o_proj"] = cols(
            attn + "o_proj.weight", (hidden, c.num_attention_heads * hd), q0, q0 + nq
        )
        mlp = hf + "mlp."
        sources[p + "mlp.gate_up_proj"] = cat(
            rows(mlp + "gate_proj.weight", (c.intermediate_size, hidden), f0, f0 + nf),
            rows(mlp + "up_proj.weight", (c.intermediate_size, hidden), f0, f0 + nf),
        )
        sources[p + "mlp.down_proj"] = cols(
            mlp + "down_proj.weight", (hidden, c.intermediate_size), f0, f0 + nf
        )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sources[p + norm + ".weight"] = lambda n=hf + norm + ".weight": reader.read(
                n, (hidden,)
            )
    return sources


def load_model(path: str, state: ParallelState, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """Build the model for this rank and fill it with its shard of the checkpoint at ``path``."""
    config = read_config(path)
    model = LlamaModel(config, state, dtype=dtype)
    with ExitStack() as stack:
        reader = _Reader(weight_files(path), stack)
        if _shares_embedding(config, reader):
            # One tensor, not two copies of the vocabulary; the output layer's (transposed)
            # layout wins, as the output matmul costs far more than the embedding lookup.
            model.embed_tokens = model.lm_head
        params = dict(model.named_parameters())
        sources = _shard_sources(config, model.layout, reader)
        if set(sources) != set(params):
            raise RuntimeError(
                f"loader/model mismatch: {sorted(set(sources) ^ set(params))}"
            )  # a bug here, not in the checkpoint
        with torch.no_grad():
            for name, load in sources.items():
                param = params[name]
                tensor = load()
                if tensor.shape != param.shape:
                    raise ValueError(
                        f"{name}: shard shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                    )
                param.copy_(tensor.to(dtype))
    return model.eval()
