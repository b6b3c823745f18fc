"""The layers of the tensor-parallel Llama: RMSNorm, RoPE, attention, the MLP, the decoder block.

Each layer holds this rank's shard of its weights (see ``TPLayout``): Q/K/V and gate/up are
column-parallel, fused into one matmul each (a rank owns whole attention heads, whole
grouped-query KV heads and a slice of the MLP width); the attention output and down
projections are row-parallel, their partial results summed by ``TPGroup.all_reduce``. So a
decoder layer costs exactly two all-reduces, as in Megatron.

Attention writes the new K/V into, and reads the history from, the KV blocks ``ForwardStep``
names; the model builds that step once per forward and every layer shares it. The ``causal``
methods are the same layers without a KV cache, for training (models/training.py): the
column-parallel matmuls take their input through ``TPGroup.copy_in``, a no-op unless autograd
is recording, so the serving path computes exactly what it did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig, TPLayout
from .tp_collectives import TPGroup


@dataclass
class ForwardStep:
    """Per-forward values every layer shares (positions, RoPE tables, mask)."""

    cos: torch.Tensor  # [B, S, 1, head_dim]
    sin: torch.Tensor
    positions: torch.Tensor  # [B, S]
    slots: torch.Tensor  # [B, W] block table (one column: a slot per row)
    first_slot: int | None  # rows use slots first_slot.. in order: read the cache as a view
    write_blocks: torch.Tensor  # [B, S] block of each new position
    write_offsets: torch.Tensor  # [B, S] its offset in that block
    read_blocks: int  # table columns holding the kv_len keys
    kv_len: int  # keys to read from the cache: max over rows of start + S
    mask: torch.Tensor | None  # [B, 1, S, kv_len] bool, None when all rows start at 0


def empty_weight(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Parameter:
    """An uninitialized frozen parameter: the checkpoint loader fills every one."""
    return torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(torch.nn.Module):
    """Llama's RMSNorm: normalize in fp32, cast back, then scale (HF's order of operations)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = empty_weight(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE in HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _read_cache(cache: torch.Tensor, step: ForwardStep) -> torch.Tensor:
    """The rows' K or V history [B, kv, kv_len, hd]: a view when slots are in order, else
    one gather of the rows' blocks."""
    b, n = len(step.slots), step.read_blocks
    if step.first_slot is not None:
        history = cache[step.first_slot : step.first_slot + b, : step.kv_len]
    elif n == 1:
        history = cache[:, : step.kv_len].index_select(0, step.slots[:, 0])
    else:
        blocks = cache.index_select(0, step.slots[:, :n].reshape(-1))
        history = blocks.view(b, n * cache.shape[1], *cache.shape[2:])[:, : step.kv_len]
    return history.transpose(1, 2)


class Attention(torch.nn.Module):
    """Grouped-query attention over this rank's heads, with the slot-indexed KV cache."""

    def __init__(
        self, config: ModelConfig, lay: TPLayout, tp: TPGroup, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = lay.heads, lay.kv_heads, config.head_dim
        qkv_rows = (lay.heads + 2 * lay.kv_heads) * config.head_dim
        self.qkv_proj = empty_weight(qkv_rows, config.hidden_size, dtype=dtype, device=device)
        self.o_proj = empty_weight(
            config.hidden_size, lay.heads * config.head_dim, dtype=dtype, device=device
        )
        self.tp = tp

    def forward(
        self, x: torch.Tensor, step: ForwardStep, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, step.cos, step.sin)
        k_cache[step.write_blocks, step.write_offsets] = k  # [B, S, kv, hd] both sides
        v_cache[step.write_blocks, step.write_offsets] = v
        q = q.transpose(1, 2)
        if step.mask is None:  # every row starts at 0: the new K/V are the whole history
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q, keys, values, is_causal=q.shape[2] > 1, enable_gqa=self.heads != self.kv_heads
            )
        else:
            keys, values = _read_cache(k_cache, step), _read_cache(v_cache, step)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=step.mask, enable_gqa=self.heads != self.kv_heads
            )
        return self._project_out(out)

    def causal(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention of every position over those before it, without a KV cache (training:
        rows start at position 0, so padding at a row's end is never attended to)."""
        q, k, v = self._qkv(x, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=x.shape[1] > 1,
            enable_gqa=self.heads != self.kv_heads,
        )
        return self._project_out(out)

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q and K (rotated) and V of this rank's heads, each [B, S, heads, hd]."""
        b, s, _ = x.shape
        qkv = F.linear(self.tp.copy_in(x), self.qkv_proj)
        qkv = qkv.view(b, s, self.heads + 2 * self.kv_heads, self.head_dim)
        qk = _rotate(qkv[:, :, : self.heads + self.kv_heads], cos, sin)
        q, k = qk.split([self.heads, self.kv_heads], dim=2)
        return q, k, qkv[:, :, self.heads + self.kv_heads :]

    def _project_out(self, out: torch.Tensor) -> torch.Tensor:
        """The row-parallel output projection of attention's [B, heads, S, hd], summed."""
        b, _, s, _ = out.shape
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.tp.all_reduce(F.linear(out, self.o_proj))


class MLP(torch.nn.Module):
    """SwiGLU with fused column-parallel gate/up and a row-parallel down projection."""

    def __init__(
        self, config: ModelConfig, lay: TPLayout, tp: TPGroup, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.width = lay.intermediate
        self.gate_up_proj = empty_weight(
            2 * lay.intermediate, config.hidden_size, dtype=dtype, device=device
        )
        self.down_proj = empty_weight(
            config.hidden_size, lay.intermediate, dtype=dtype, device=device
        )
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(self.tp.copy_in(x), self.gate_up_proj).split(self.width, dim=-1)
        return self.tp.all_reduce(F.linear(F.silu(gate) * up, self.down_proj))


class DecoderLayer(torch.nn.Module):
    """Pre-norm residual block: attention then SwiGLU MLP (two all-reduces under TP)."""

    def __init__(
        self, config: ModelConfig, lay: TPLayout, tp: TPGroup, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.self_attn = Attention(config, lay, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.mlp = MLP(config, lay, tp, dtype, device)

    def forward(self, x: torch.Tensor, step: ForwardStep, k_cache, v_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def causal(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The block without a KV cache (``Attention.causal``): the training forward."""
        x = x + self.self_attn.causal(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))
