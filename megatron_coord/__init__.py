"""megatron_coord: a data-parallel inference coordinator for torchrun launches.

The public names below are stable (see DESIGN.md). They are imported lazily, so importing one
submodule (say ``megatron_coord.models.llama`` in an engine) does not pull in the others, and importing
the client or coordinator never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "DataParallelInferenceCoordinator": "coordinator",
    "InferenceClient": "client",
    "Headers": "protocol",
    "SamplingParams": "sampling_params",
    "WeightUpdateError": "client_updates",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_coord' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
