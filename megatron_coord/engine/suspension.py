"""SUSPEND and RESUME: the memory a replica hands back while it does not serve.

SUSPEND frees the KV cache's tensors (on CUDA the memory then goes back to the device through
``torch.cuda.empty_cache()``; on CPU it is freed); ours may ask, ``[SUSPEND,
{"offload_weights": true}]``, to move the weights to CPU memory as well (vLLM's sleep level 1;
on a CPU replica they are there already, so nothing moves). Requests keep their places and
their KV blocks' bookkeeping, but the KV contents are gone: the prefix cache forgets every
block (``kv_blocks_reset``), and RESUME reallocates the cache, brings the weights back and
rebuilds the KV of the requests that were running (weight_versions.rebuild_kv), so they go on
exactly where they stopped. Requests arriving meanwhile wait in the queue.
"""

from __future__ import annotations

from typing import Any

import torch

from .weight_versions import rebuild_kv

# The engine is duck-typed here: engine.py imports this module.


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_bytes(engine: Any) -> int:
    """Bytes of KV cache the engine holds now (0 while suspended)."""
    return tensor_bytes(engine.kv_cache.k) + tensor_bytes(engine.kv_cache.v)


def weight_bytes(model: Any) -> int:
    """Bytes of this rank's weights (a tied embedding counted once), wherever they are."""
    return tensor_bytes(model.parameters())


def _move_weights(model: Any, device: torch.device) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(device)


def suspend(engine: Any, offload_weights: bool = False) -> None:
    """Free the KV cache (and with ``offload_weights``, move the weights to CPU memory)."""
    if not engine.suspended:
        cache = engine.kv_cache
        cache.k, cache.v = [], []
        engine.blocks.reset_cache(engine.blocks.salt)  # their contents are gone
        engine.suspended = True
    if offload_weights and not engine.weights_offloaded and engine.device.type != "cpu":
        _move_weights(engine.model, torch.device("cpu"))
        engine.weights_offloaded = True
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


def resume(engine: Any) -> None:
    """Bring back what ``suspend`` released, and the KV of the requests that were running."""
    if not engine.suspended:
        return
    if engine.weights_offloaded:
        _move_weights(engine.model, engine.device)
        engine.weights_offloaded = False
    blocks = engine.blocks
    engine.kv_cache = engine.model.allocate_kv_cache(blocks.num_blocks, blocks.block_size)
    engine.suspended = False
    rebuild_kv(engine, list(engine.active.values()))
