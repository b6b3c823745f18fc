"""Which part of which Hugging Face tensor each local parameter of a TP rank holds.

One description of the tensor-parallel sharding, read by both ways weights arrive: the
checkpoint loader (``checkpoint.py``: each rank reads only the rows or columns it needs) and the
weight-update receiver (``megatron_coord.weights``: a rank keeps its part of each full tensor a
trainer broadcasts). A local parameter is filled by one or more ``ShardPart``: whole tensors
(the norms), row ranges stacked in order (Q/K/V into ``qkv_proj``, gate/up into
``gate_up_proj``, a vocabulary range into the embedding and output layer, whose padding rows
past the vocabulary stay zero) or a column range (the row-parallel ``o_proj`` and
``down_proj``). The plan is plain data (no tensors, no I/O); ``copy_into`` writes a part into
a parameter, fast also where the parameter is stored transposed (the output layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig, TPLayout

EMBEDDING = "model.embed_tokens.weight"
OUTPUT_LAYER = "lm_head.weight"
_TRANSPOSE_CHUNK_BYTES = 1 << 20  # staging for a transposed copy, a chunk of rows at a time


@dataclass(frozen=True)
class ShardPart:
    """One checkpoint tensor's share of a local parameter.

    ``dim`` None: the whole tensor; 0: its rows ``[lo, hi)``, written to the parameter's rows
    from ``row`` on; 1: its columns ``[lo, hi)``, the whole parameter (every row)."""

    name: str  # the Hugging Face tensor name
    shape: tuple[int, ...]  # that tensor's full shape
    dim: int | None = None
    lo: int = 0
    hi: int = 0
    row: int = 0

    @property
    def rows(self) -> int:
        """Rows of the local parameter this part fills (all of them for dim 1)."""
        if self.dim == 0:
            return self.hi - self.lo
        return self.shape[0]


def shard_plan(config: ModelConfig, lay: TPLayout, tied: bool) -> dict[str, list[ShardPart]]:
    """For each local parameter name (``LlamaModel.named_parameters()``), the parts that fill
    it. ``tied``: the output layer is the embedding (one parameter, no ``lm_head.weight``)."""
    c = config
    hd, hidden = c.head_dim, c.hidden_size
    plan: dict[str, list[ShardPart]] = {}

    def vocab(name: str) -> list[ShardPart]:
        lo = lay.vocab_start
        hi = min(lo + lay.vocab_part, c.vocab_size)
        return [ShardPart(name, (c.vocab_size, hidden), 0, lo, hi)] if hi > lo else []

    plan["embed_tokens"] = vocab(EMBEDDING)
    if not tied:
        plan["lm_head"] = vocab(OUTPUT_LAYER)
    plan["norm.weight"] = [ShardPart("model.norm.weight", (hidden,))]

    q0, k0 = lay.rank * lay.heads * hd, lay.rank * lay.kv_heads * hd
    nq, nk = lay.heads * hd, lay.kv_heads * hd
    f0, nf = lay.rank * lay.intermediate, lay.intermediate
    q_shape = (c.num_attention_heads * hd, hidden)
    kv_shape = (c.num_key_value_heads * hd, hidden)
    mlp_shape = (c.intermediate_size, hidden)
    for i in range(c.num_hidden_layers):
        p, hf = f"layers.{i}.", f"model.layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        plan[p + "self_attn.qkv_proj"] = [
            ShardPart(attn + "q_proj.weight", q_shape, 0, q0, q0 + nq, 0),
            ShardPart(attn + "k_proj.weight", kv_shape, 0, k0, k0 + nk, nq),
            ShardPart(attn + "v_proj.weight", kv_shape, 0, k0, k0 + nk, nq + nk),
        ]
        plan[p + "self_attn.o_proj"] = [
            ShardPart(attn + "o_proj.weight", (hidden, c.num_attention_heads * hd), 1, q0, q0 + nq)
        ]
        plan[p + "mlp.gate_up_proj"] = [
            ShardPart(mlp + "gate_proj.weight", mlp_shape, 0, f0, f0 + nf, 0),
            ShardPart(mlp + "up_proj.weight", mlp_shape, 0, f0, f0 + nf, nf),
        ]
        plan[p + "mlp.down_proj"] = [
            ShardPart(mlp + "down_proj.weight", (hidden, c.intermediate_size), 1, f0, f0 + nf)
        ]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plan[p + norm + ".weight"] = [ShardPart(hf + norm + ".weight", (hidden,))]
    return plan


def tensor_names(plan: dict[str, list[ShardPart]]) -> set[str]:
    """The Hugging Face tensors a plan reads."""
    return {part.name for parts in plan.values() for part in parts}


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` for a 2-D ``target`` that may be a transposed view (the output
    layer is stored ``[hidden, vocab]``): a row-major copy into a column-major view strides
    through memory (~5x slower on CPU), so rows are staged, a chunk at a time, transposed in a
    small buffer and written as contiguous runs."""
    if target.dim() != 2 or target.stride(0) != 1 or target.stride(1) == 1 or target.numel() < 2:
        target.copy_(source)
        return
    rows, cols = target.shape
    columns = target.t()  # [cols, rows], each of its rows contiguous
    step = max(1, _TRANSPOSE_CHUNK_BYTES // max(1, cols * target.element_size()))
    stage = torch.empty(cols, min(step, rows), dtype=target.dtype, device=target.device)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        chunk = stage[:, : end - start]
        chunk.copy_(source[start:end].t())
        columns[:, start:end].copy_(chunk)
