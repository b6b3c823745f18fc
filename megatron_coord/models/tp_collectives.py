"""The tensor-parallel collectives, the only place the model talks to its TP group.

Every cross-rank exchange of the forward pass goes through ``TPGroup``: the all-reduce after
each row-parallel projection and after the vocab-parallel embedding, and the all-gather of
the vocab-parallel logits. Keeping them here, rather than scattered over the layers, is what
lets them carry gradients in one place.

Inference runs under ``torch.inference_mode``, where no tensor requires grad: every method
then takes its plain path (an in-place collective, or none), so serving pays one attribute
test per call. Training (models/training.py) runs with autograd, and the methods switch to
Megatron's autograd functions, which make each rank's gradients those of the unsplit model:

- ``copy_in`` ("copy to the TP region"), before a column-parallel matmul: identity forward;
  backward all-reduces, since every rank's slice of the output depends on the whole
  (replicated) input, so the input's gradient is the sum of the ranks' partial gradients;
- ``all_reduce`` ("reduce from the TP region"), after a row-parallel matmul or the
  vocab-parallel embedding: all-reduce forward; identity backward, since the sum passes the
  (replicated) gradient of its output unchanged to each rank's addend;
- ``all_gather_last`` ("gather from the TP region"): backward keeps this rank's slice.

None of the backward passes modifies the gradient it is given (autograd may hand one tensor
to several functions): the all-reduces work on a copy.

A thread may run the model on a process group of its own (``use_group_in_this_thread``): the
in-process serving of a training script (megatron_coord.training_inference) serves the very
model it trains from a background thread, on serving groups, so a serving collective never
pairs with one of the script's training collectives on a shared group.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from ..parallel_state import ParallelState


def _summed(x: torch.Tensor, group) -> torch.Tensor:
    """A contiguous copy of ``x`` all-reduced (sum) over ``group``."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    """Identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _summed(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        return _summed(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along the last dimension forward; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
        ctx.part, ctx.rank = x.shape[-1], rank
        return _gather_last(x, group, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo = ctx.rank * ctx.part
        return grad[..., lo : lo + ctx.part], None, None, None


def _gather_last(x: torch.Tensor, group, size: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class TPGroup:
    """The collectives the model needs, no-ops when TP == 1; differentiable under autograd."""

    def __init__(self, state: ParallelState) -> None:
        self.size = state.tensor_parallel_size
        self.rank = state.tp_rank
        self._group = state.tp_group
        self._local = threading.local()

    @property
    def group(self):
        """The process group of this thread's collectives: the model's own TP group, unless
        this thread chose another (``use_group_in_this_thread``)."""
        return getattr(self._local, "group", self._group)

    def use_group_in_this_thread(self, group) -> None:
        """Run this thread's collectives on ``group`` (same ranks as the TP group)."""
        self._local.group = group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group: in place for inference, out of place with a gradient."""
        if self.size > 1:
            if x.requires_grad:
                return _ReduceFromRegion.apply(x, self.group)
            dist.all_reduce(x, group=self.group)
        return x

    def copy_in(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself, marked so that its gradient is summed over the group in backward:
        the input of every column-parallel matmul."""
        if self.size > 1 and x.requires_grad:
            return _CopyToRegion.apply(x, self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension (rank order)."""
        if self.size == 1:
            return x
        if x.requires_grad:
            return _GatherFromRegion.apply(x, self.group, self.size, self.rank)
        return _gather_last(x, self.group, self.size)

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``x`` over the group, without a gradient (a shift
        that cancels out, as in a log-softmax)."""
        if self.size == 1:
            return x.detach()
        out = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out
