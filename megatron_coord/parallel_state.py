"""Tensor- and data-parallel layout of a torchrun world.

Contiguous ranks form a tensor-parallel (TP) group, as in Megatron: with T = TP size, ranks
0..T-1 are data-parallel (DP) rank 0, ranks T..2T-1 are DP rank 1, and so on. Rank 0 of each TP
group is its TP-coordinator, the only process that talks to the coordinator over ZMQ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the world. ``tp_group`` is None when T == 1."""

    rank: int
    world_size: int
    tensor_parallel_size: int
    tp_rank: int
    dp_rank: int
    data_parallel_size: int
    tp_group: Any
    tp_src_rank: int  # global rank of this TP group's rank 0 (the broadcast source)
    backend: str
    device: torch.device

    @property
    def is_tp_coordinator(self) -> bool:
        return self.tp_rank == 0


def layout(rank: int, world_size: int, tensor_parallel_size: int) -> tuple[int, int, int]:
    """Return (tp_rank, dp_rank, data_parallel_size) for a global rank; checks divisibility."""
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-parallel size "
            f"{tensor_parallel_size}"
        )
    return (
        rank % tensor_parallel_size,
        rank // tensor_parallel_size,
        world_size // tensor_parallel_size,
    )


def initialize(tensor_parallel_size: int = 1, timeout_s: float = 600.0) -> ParallelState:
    """Initialize torch.distributed from torchrun's environment and build the TP groups.

    NCCL when CUDA is present (each process takes GPU ``LOCAL_RANK``), gloo otherwise. Every
    rank creates every TP group, as ``new_group`` requires.
    """
    from datetime import timedelta

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout(rank, world_size, tensor_parallel_size)  # a bad TP size fails before the rendezvous

    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )

    return build_state(rank, world_size, tensor_parallel_size, backend, device)


def build_state(
    rank: int, world_size: int, tensor_parallel_size: int, backend: str, device: torch.device
) -> ParallelState:
    """This rank's ParallelState over an initialized world, with new TP groups of contiguous
    ranks (collective: every rank calls it, in the same order as its other ``new_group``s)."""
    tp_rank, dp_rank, dp_size = layout(rank, world_size, tensor_parallel_size)
    tp_group = None
    for first in range(0, world_size, tensor_parallel_size):
        ranks = list(range(first, first + tensor_parallel_size))
        group = dist.new_group(ranks) if tensor_parallel_size > 1 else None
        if rank in ranks:
            tp_group = group
    return ParallelState(
        rank=rank,
        world_size=world_size,
        tensor_parallel_size=tensor_parallel_size,
        tp_rank=tp_rank,
        dp_rank=dp_rank,
        data_parallel_size=dp_size,
        tp_group=tp_group,
        tp_src_rank=rank - tp_rank,
        backend=backend,
        device=device,
    )


def single_process_state(device: str = "cpu") -> ParallelState:
    """A TP=1, DP=1 state with no process group, for in-process use and tests."""
    return ParallelState(0, 1, 1, 0, 0, 1, None, 0, "none", torch.device(device))
