"""A Llama-architecture decoder with Megatron-style tensor parallelism, for inference.

One file on purpose (a little over 500 lines): the layers, the KV cache and the forward pass
read best in one sitting, as nanoGPT's model.py does.

Each rank of a tensor-parallel (TP) group holds one shard of every weight:

- the embedding and the output layer are split over the (padded) vocabulary: a rank looks up
  only the tokens in its vocabulary range (others read as zero) and an all-reduce sums the
  partial embeddings; the output layer computes the rank's slice of the logits and an
  all-gather rebuilds the full row, identical on every rank;
- Q/K/V and gate/up are column-parallel (each rank owns whole attention heads, whole
  grouped-query KV heads, and a slice of the MLP width); they are fused into one matmul each;
- the attention output and down projections are row-parallel: each rank multiplies its slice
  and an all-reduce sums the partial results.

So a layer costs exactly two all-reduces, as in Megatron. The KV cache is a pool of *blocks*
of equal length (managed by the engine), so a decode step can mix requests at different
positions: row b writes its new K/V at ``start_positions[b]..`` and attends causally over its
positions ``[0, start_positions[b] + S)``. A row's positions live either in one block (``slots``
[B]: a block per request, as long as the sequence) or in the blocks of its block table
(``slots`` [B, W]: position p in block ``table[b, p // block_len]``), which lets rows share the
blocks of a common prefix (prefix caching, engine/kv_blocks.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..parallel_state import ParallelState


@dataclass
class ModelConfig:
    """The subset of a Hugging Face ``LlamaConfig`` this model implements."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict, refusing features this model does not implement.

        Accepts both transformers 4 (``rope_theta``/``rope_scaling``) and 5
        (``rope_parameters``) spellings of the RoPE settings.
        """
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"unsupported model_type {model_type!r}: only 'llama' is supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: Llama's SwiGLU needs 'silu'")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key, False):
                raise ValueError(f"unsupported {key}=True: this Llama has no biases")
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in d
        ]
        if missing:
            raise ValueError(f"config.json lacks required keys: {missing}")
        heads = int(d["num_attention_heads"])
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // heads
        config = cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Check sizes are positive and heads group evenly (GQA needs heads % kv_heads == 0)."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")


def _rope_theta(d: dict[str, Any]) -> float:
    """Read rope_theta; only plain RoPE (no scaling) is implemented, so refuse the others."""
    scaling = d.get("rope_scaling")
    if scaling is not None and (
        not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "default"
    ):
        raise ValueError(f"unsupported rope_scaling {scaling!r}: only None is supported")
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"rope_parameters must be a dict, got {params!r}")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE type {rope_type!r}: only 'default' is supported")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(d.get("rope_theta", 10000.0))


@dataclass(frozen=True)
class TPLayout:
    """How the model's dimensions split over ``tp`` ranks; raises if they do not divide."""

    tp: int
    rank: int
    heads: int  # local attention heads
    kv_heads: int  # local KV heads
    intermediate: int  # local MLP width
    vocab_padded: int  # whole vocabulary, padded to a multiple of tp
    vocab_part: int  # local vocabulary rows

    @classmethod
    def of(cls, config: ModelConfig, tp: int, rank: int) -> TPLayout:
        for name, value in (
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.num_key_value_heads),
            ("intermediate_size", config.intermediate_size),
        ):
            if value % tp != 0:
                raise ValueError(
                    f"{name} ({value}) is not divisible by the tensor-parallel size ({tp})"
                )
        vocab_padded = math.ceil(config.vocab_size / tp) * tp
        return cls(
            tp=tp,
            rank=rank,
            heads=config.num_attention_heads // tp,
            kv_heads=config.num_key_value_heads // tp,
            intermediate=config.intermediate_size // tp,
            vocab_padded=vocab_padded,
            vocab_part=vocab_padded // tp,
        )

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_part


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


@dataclass
class _Step:
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


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Parameter:
    """An uninitialized frozen parameter: the checkpoint loader fills every one."""
    return torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


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


class RMSNorm(torch.nn.Module):
    """Llama's RMSNorm: normalize in fp32, cast back, then scale (HF's order of operations)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = _empty(size, dtype=dtype, device=device)
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


def _read_cache(cache: torch.Tensor, step: _Step) -> torch.Tensor:
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
        self.qkv_proj = _empty(qkv_rows, config.hidden_size, dtype=dtype, device=device)
        self.o_proj = _empty(
            config.hidden_size, lay.heads * config.head_dim, dtype=dtype, device=device
        )
        self.tp = tp

    def forward(
        self, x: torch.Tensor, step: _Step, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.head_dim
        qkv = F.linear(x, self.qkv_proj).view(b, s, self.heads + 2 * self.kv_heads, hd)
        qk = _rotate(qkv[:, :, : self.heads + self.kv_heads], step.cos, step.sin)
        q, k = qk.split([self.heads, self.kv_heads], dim=2)
        v = qkv[:, :, self.heads + self.kv_heads :]
        k_cache[step.write_blocks, step.write_offsets] = k  # [B, S, kv, hd] both sides
        v_cache[step.write_blocks, step.write_offsets] = v
        q = q.transpose(1, 2)
        if step.mask is None:  # every row starts at 0: the new K/V are the whole history
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q, keys, values, is_causal=s > 1, enable_gqa=self.heads != self.kv_heads
            )
        else:
            keys, values = _read_cache(k_cache, step), _read_cache(v_cache, step)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=step.mask, enable_gqa=self.heads != self.kv_heads
            )
        out = out.transpose(1, 2).reshape(b, s, self.heads * hd)
        return self.tp.all_reduce(F.linear(out, self.o_proj))


class MLP(torch.nn.Module):
    """SwiGLU with fused column-parallel gate/up and a row-parallel down projection."""

    def __init__(
        self, config: ModelConfig, lay: TPLayout, tp: TPGroup, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.width = lay.intermediate
        self.gate_up_proj = _empty(
            2 * lay.intermediate, config.hidden_size, dtype=dtype, device=device
        )
        self.down_proj = _empty(config.hidden_size, lay.intermediate, dtype=dtype, device=device)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj).split(self.width, dim=-1)
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

    def forward(self, x: torch.Tensor, step: _Step, k_cache, v_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.embed_tokens = _empty(lay.vocab_part, config.hidden_size, dtype=dtype, device=dev)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(config, lay, self.tp, dtype, dev) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, dev)
        # [vocab_part, hidden] like the checkpoint, but stored transposed: x @ W on a
        # contiguous [hidden, vocab_part] runs ~20% faster on CPU than x @ W.T for the decode
        # shapes (5.3 -> 4.2 ms for the default model, batch 8), and 2x for all-logits prefill.
        self.lm_head = torch.nn.Parameter(
            _empty(config.hidden_size, lay.vocab_part, dtype=dtype, device=dev).t(),
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
        step = self._prepare(tokens, start_positions, slots, kv_cache)
        x = self._embed(tokens.to(self.device))
        for layer, k_cache, v_cache in zip(self.layers, kv_cache.k, kv_cache.v, strict=True):
            x = layer(x, step, k_cache, v_cache)
        if not all_logits:
            x = x[:, -1:]
        logits = self._output(self.norm(x))
        return logits if all_logits else logits[:, 0]

    def _prepare(
        self, tokens: torch.Tensor, start: torch.Tensor, slots: torch.Tensor, cache: KVCache
    ) -> _Step:
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
        return _Step(
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
