"""Where a training script's rank sits, and the process groups its serving uses.

The script initialized torch.distributed and built its model for its TP rank; the layout is
the launch's (parallel_state.py: contiguous ranks form a TP group, DP = world / TP). Serving
gets process groups of its own, made here by every rank in the same order (``new_group`` is
collective over the world): a TP group for the step broadcast and the model's serving
forward, and (by EngineServer's step guard) an agreement group. A gloo group over the whole
world carries this API's own barriers and small exchanges (``control``), whatever the
script's backend, so they need no device and never share a group with the script's
collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from ..parallel_state import ParallelState, build_state, layout


@dataclasses.dataclass
class ServingLayout:
    """This rank's serving ParallelState (its TP group a serving one) and the control group."""

    state: ParallelState
    control: Any


def check_world(model: Any, tensor_parallel_size: int) -> tuple[int, int, int, int, int]:
    """(rank, world size, tp rank, dp rank, dp size) of this rank; ValueError when the world
    is not initialized or the model was not built for this rank's place."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "TrainingInference needs an initialized torch.distributed world "
            "(torchrun, then torch.distributed.init_process_group)"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    tp_rank, dp_rank, dp_size = layout(rank, world, tensor_parallel_size)
    state = getattr(model, "state", None)
    if not isinstance(state, ParallelState):
        raise TypeError("model must be a megatron_coord LlamaModel (built with a ParallelState)")
    if state.tensor_parallel_size != tensor_parallel_size or state.tp_rank != tp_rank:
        raise ValueError(
            f"the model was built for TP size {state.tensor_parallel_size}, TP rank "
            f"{state.tp_rank}; this rank is TP rank {tp_rank} of TP size {tensor_parallel_size}"
        )
    return rank, world, tp_rank, dp_rank, dp_size


def serving_layout(model: Any, tensor_parallel_size: int) -> ServingLayout:
    """Make the serving groups (collective over the world: every rank calls it together)."""
    rank, world, _, _, _ = check_world(model, tensor_parallel_size)
    control = dist.new_group(list(range(world)), backend="gloo")
    device = torch.device(model.device)
    state = build_state(rank, world, tensor_parallel_size, dist.get_backend(), device)
    return ServingLayout(state, control)


def share(value: Any, control: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (collective over the control group)."""
    box = [value]
    dist.broadcast_object_list(box, src=src, group=control)
    return box[0]


def gather(value: Any, control: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (collective over the control group)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=control)
    return out


def destroy(*groups: Any) -> None:
    """Destroy these process groups (None skipped; errors of a torn-down world ignored)."""
    for group in groups:
        if group is None:
            continue
        with contextlib.suppress(RuntimeError, ValueError, KeyError):
            dist.destroy_process_group(group)
