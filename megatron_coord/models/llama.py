"""A Llama-architecture decoder with Megatron-style tensor parallelism, for inference.

Each rank of a tensor-parallel (TP) group holds one shard of every weight:

- the embedding and the output layer are split over the (padded) vocabulary: a rank looks up
  only the tokens in its vocabulary range (others read as zero) and an all-reduce sums the
  partial embeddings; the output layer computes the rank's slice of the logits and an
  all-gather rebuilds the full row, identical on every rank;
- the decoder layers (``layers.py``) are column-parallel in, row-parallel out: two
  all-reduces a layer, as in Megatron. Every collective is a ``TPGroup`` call
  (``tp_collectives.py``); the sizes and their split are in ``config.py``.

This module holds the model itself, its KV cache and the per-forward step preparation. The KV
cache is a pool of *blocks* of equal length (managed by the engine), so a decode step can mix
requests at different positions: row b writes its new K/V at ``start_positions[b]..`` and
attends causally over its positions ``[0, start_positions[b] + S)``. A row's positions live
either in one block (``slots`` [B]: a block per request, as long as the sequence) or in the
blocks of its block table (``slots`` [B, W]: position p in block ``table[b, p // block_len]``),
which lets rows share the blocks of a common prefix (prefix caching, engine/kv_blocks.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..parallel_state import ParallelState
from .config import ModelConfig, TPLayout
from .layers import DecoderLayer, ForwardStep, RMSNorm, empty_weight
from .tp_collectives import TPGroup

__all__ = ["KVCache", "LlamaModel", "ModelConfig"]


@dataclass
class KVCache:
    """Per-layer K and V, each ``[blocks, block_len, n_kv_heads_local, head_dim]``.

    ``allocate_kv_cache(max_batch_size, max_seq_len)`` names the blocks slots (one per request,
    as long as a sequence); a paged pool is the same object with many short blocks.
    Position-major blocks make a block table's gather a plain ``index_select`` + ``view``.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    max_batch_size: int  # number of blocks
    max_seq_len: int  # positions per block


def _slot_checks(slots: torch.Tensor) -> list[torch.Tensor]:
    """[repeated entries, 1 if strictly ascending] of a 1-D tensor, computed on its device."""
    ordered = slots.sort().values
    return [(ordered[1:] == ordered[:-1]).sum(), (slots[1:] > slots[:-1]).all().long()]


def _write_places(
    table: torch.Tensor, positions: torch.Tensor, block_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) [B, S] of each new position (clamped: checked by the caller)."""
    columns = (positions // block_len).clamp(0, table.shape[1] - 1)
    return table.gather(1, columns), positions % block_len


class LlamaModel(torch.nn.Module):
    """Tensor-parallel Llama for inference. Weights start uninitialized; load them with
    ``megatron_coord.models.checkpoint.load_model`` (or fill ``state_dict()`` yourself)."""

    def __init__(
        self, config: ModelConfig, state: ParallelState, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.state = state
        self.dtype = dtype
        self.device = torch.device(state.device)
        self.layout = TPLayout.of(config, state.tensor_parallel_size, state.tp_rank)
        self.tp = TPGroup(state)
        lay, dev = self.layout, self.device
        self.embed_tokens = empty_weight(
            lay.vocab_part, config.hidden_size, dtype=dtype, device=dev
        )
        self.layers = torch.nn.ModuleList(
            DecoderLayer(config, lay, self.tp, dtype, dev) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, dev)
        # [vocab_part, hidden] like the checkpoint, but stored transposed: x @ W on a
        # contiguous [hidden, vocab_part] runs ~20% faster on CPU than x @ W.T for the decode
        # shapes (5.3 -> 4.2 ms for the default model, batch 8), and 2x for all-logits prefill.
        self.lm_head = torch.nn.Parameter(
            empty_weight(config.hidden_size, lay.vocab_part, dtype=dtype, device=dev).t(),
            requires_grad=False,
        )
        self._rope_len = 0
        self._cos = self._sin = torch.empty(0)
        self._ensure_rope(config.max_position_embeddings)

    # ---- setup -----------------------------------------------------------------------------

    def allocate_kv_cache(self, max_batch_size: int, max_seq_len: int) -> KVCache:
        """Zeroed K/V for ``max_batch_size`` slots of ``max_seq_len`` positions each (or,
        for block tables, that many blocks of that many positions)."""
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(
                f"max_batch_size and max_seq_len must be >= 1, got {max_batch_size}, {max_seq_len}"
            )
        self._ensure_rope(max_seq_len)
        shape = (max_batch_size, max_seq_len, self.layout.kv_heads, self.config.head_dim)
        n = self.config.num_hidden_layers
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        return KVCache(k=k, v=v, max_batch_size=max_batch_size, max_seq_len=max_seq_len)

    def _ensure_rope(self, length: int) -> None:
        """Precompute cos/sin for positions < length, exactly as HF does (fp32, then cast)."""
        if length <= self._rope_len:
            return
        hd = self.config.head_dim
        inv_freq = 1.0 / (
            self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
        )
        freqs = torch.arange(length, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(device=self.device, dtype=self.dtype)
        self._sin = emb.sin().to(device=self.device, dtype=self.dtype)
        self._rope_len = length

    # ---- forward ---------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start_positions: torch.Tensor,
        slots: torch.Tensor,
        kv_cache: KVCache,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run ``tokens`` [B, S] at ``start_positions`` [B] in KV ``slots`` [B] (a slot per
        row) or [B, W] (a block table per row; rows may share the blocks they only read).

        Returns float32 logits over the full vocabulary: [B, vocab] for each row's last
        position, or [B, S, vocab] with ``all_logits``. Identical on every TP rank.
        """
        x = self.hidden_states(tokens, start_positions, slots, kv_cache, last_only=not all_logits)
        logits = self._output(x)
        return logits if all_logits else logits[:, 0]

    @torch.inference_mode()
    def hidden_states(
        self,
        tokens: torch.Tensor,
        start_positions: torch.Tensor,
        slots: torch.Tensor,
        kv_cache: KVCache,
        last_only: bool = False,
    ) -> torch.Tensor:
        """``forward`` up to the final norm: [B, S, hidden] (``last_only``: [B, 1, hidden]).

        With ``output_logits`` it lets a caller turn many positions into logits a chunk at a
        time (prompt log-probs) instead of holding [B, S, vocab] at once.
        """
        step = self._prepare(tokens, start_positions, slots, kv_cache)
        x = self._embed(tokens.to(self.device))
        for layer, k_cache, v_cache in zip(self.layers, kv_cache.k, kv_cache.v, strict=True):
            x = layer(x, step, k_cache, v_cache)
        if last_only:
            x = x[:, -1:]
        return self.norm(x)

    @torch.inference_mode()
    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 full-vocabulary logits of final hidden states (collective under TP)."""
        return self._output(hidden)

    def _prepare(
        self, tokens: torch.Tensor, start: torch.Tensor, slots: torch.Tensor, cache: KVCache
    ) -> ForwardStep:
        """Validate the arguments (one host sync) and build positions, RoPE and mask."""
        if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be a non-empty [B, S] tensor, got {tuple(tokens.shape)}")
        b, s = tokens.shape
        if start.shape != (b,) or slots.shape[:1] != (b,) or slots.dim() not in (1, 2):
            raise ValueError(
                f"start_positions and slots must have shape ({b},) (slots: or ({b}, W)), got "
                f"{tuple(start.shape)} and {tuple(slots.shape)}"
            )
        if not all(t.dtype in (torch.int64, torch.int32) for t in (tokens, start, slots)):
            raise TypeError("tokens, start_positions and slots must be integer tensors")
        if len(cache.k) != self.config.num_hidden_layers:
            raise ValueError("kv_cache was not allocated by this model")
        start = start.to(self.device, torch.int64)
        paged = slots.dim() == 2
        table = slots.to(self.device, torch.int64).reshape(b, -1)
        block_len = cache.max_seq_len
        positions = start[:, None] + torch.arange(s, device=self.device)
        write_blocks, write_offsets = _write_places(table, positions, block_len)
        if paged:  # rows may share blocks, never a place they write
            dup_check = _slot_checks((write_blocks * block_len + write_offsets).reshape(-1))
            dup_check[1] = (table[1:, 0] > table[:-1, 0]).all().long()
        else:
            dup_check = _slot_checks(table[:, 0])
        checks = torch.stack(
            [
                start.min(),
                start.max(),
                table.min(),
                table.max(),
                tokens.min().to(self.device, torch.int64),
                tokens.max().to(self.device, torch.int64),
                *dup_check,
            ]
        ).tolist()
        start_min, start_max, slot_min, slot_max, tok_min, tok_max, dups, ascending = checks
        width = table.shape[1]
        if start_min < 0 or start_max + s > width * block_len:
            blocks = f" ({width} blocks of {block_len})" if paged else ""
            raise ValueError(
                f"positions [{start_min}, {start_max + s}) do not fit the KV cache's "
                f"max_seq_len {width * block_len}{blocks}"
            )
        if slot_min < 0 or slot_max >= cache.max_batch_size:
            raise ValueError(
                f"slots must lie in [0, {cache.max_batch_size}), got [{slot_min}, {slot_max}]"
            )
        if dups:
            raise ValueError(
                "slots must be distinct within a call (two rows would share K/V)"
                if not paged
                else "block tables must not write one KV position twice within a call"
            )
        if tok_min < 0 or tok_max >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got [{tok_min}, {tok_max}]"
            )
        self._ensure_rope(start_max + s)
        cos = self._cos[positions].unsqueeze(2)
        sin = self._sin[positions].unsqueeze(2)
        kv_len = start_max + s
        mask = None
        if start_max > 0:
            keys = torch.arange(kv_len, device=self.device)
            mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        read_blocks = math.ceil(kv_len / block_len)
        contiguous = ascending and read_blocks == 1 and slot_max - slot_min + 1 == b
        if paged:  # the view needs exactly the blocks first..first+B-1 in column 0
            contiguous = contiguous and width == 1
        return ForwardStep(
            cos=cos,
            sin=sin,
            positions=positions,
            slots=table,
            first_slot=slot_min if contiguous else None,
            write_blocks=write_blocks,
            write_offsets=write_offsets,
            read_blocks=read_blocks,
            kv_len=kv_len,
            mask=mask,
        )

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: rows outside this rank's range read zero; all-reduce sums."""
        if self.layout.tp == 1:
            return F.embedding(tokens, self.embed_tokens)
        local = tokens - self.layout.vocab_start
        outside = (local < 0) | (local >= self.layout.vocab_part)
        x = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(x)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel output layer; gathers the full (unpadded) float32 logits."""
        logits = F.linear(x, self.lm_head).float()
        logits = self.tp.all_gather_last(logits)
        if logits.shape[-1] != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits
