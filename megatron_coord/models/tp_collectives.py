"""The tensor-parallel collectives, the only place the model talks to its TP group.

Every cross-rank exchange of the forward pass goes through ``TPGroup``: the all-reduce after
each row-parallel projection and after the vocab-parallel embedding, and the all-gather of
the vocab-parallel logits. Keeping them here, rather than scattered over the layers, is what
lets them change in one place (say, to carry gradients through the exchange).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel_state import ParallelState


class TPGroup:
    """The two collectives the model needs, no-ops when TP == 1."""

    def __init__(self, state: ParallelState) -> None:
        self.size = state.tensor_parallel_size
        self.group = state.tp_group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension (rank order)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)
