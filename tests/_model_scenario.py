"""Shared by the TP=1 tests and the TP=2 torchrun worker: build reference checkpoints with
transformers, and drive our model through prefill, chunked prefill and KV-cache decode.

Every scenario returns logits keyed by name, plus the (row, position) each logit row stands
for, so the test compares them with one full-sequence ``LlamaForCausalLM`` forward.
"""

from __future__ import annotations

import torch

# Small, but with every awkward feature: odd vocabulary (TP=2 pads it), GQA (4 heads over
# 2 KV heads), a non-default rope_theta and head_dim != hidden / heads.
SMALL = {
    "vocab_size": 101,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
}
BATCH, SEQ = 3, 16
PROMPT_LENS = (5, 9, 2)  # per-row prompt lengths: decode then runs at different positions
SLOTS = (3, 0, 2)  # rows live in permuted slots of a 4-slot cache
DECODE_STEPS = SEQ - max(PROMPT_LENS)
CHUNK = 6  # chunked prefill: positions [0, CHUNK) then [CHUNK, SEQ)


def save_hf_checkpoint(path: str, seed: int, tie: bool, max_shard_size: str | None = None):
    """Save a random ``LlamaForCausalLM`` (non-trivial norm weights) and return it (eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model


def scenario_tokens(seed: int = 1234) -> torch.Tensor:
    """Random ids, plus both edges of each TP=2 vocabulary half (0, 50 | 51, 100)."""
    tokens = torch.randint(
        0, SMALL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(seed)
    )
    tokens[0, :4] = torch.tensor([0, 50, 51, SMALL["vocab_size"] - 1])
    tokens[2, 1] = 51  # row 2's prompt (2 tokens) straddles the split too
    return tokens


def run_scenario(model, tokens: torch.Tensor) -> dict[str, tuple[torch.Tensor, list]]:
    """Drive ``model`` (ours) through the cases; return {name: (logits [N, V], [(row, pos)])}."""
    out = {}
    cache = model.allocate_kv_cache(4, 32)
    slots = torch.tensor(SLOTS)
    zeros = torch.zeros(BATCH, dtype=torch.long)

    # Whole batch prefill from position 0, every position's logits.
    logits = model(tokens, zeros, slots, cache, all_logits=True)
    out["prefill_all"] = (
        logits.reshape(-1, logits.shape[-1]),
        [(b, p) for b in range(BATCH) for p in range(SEQ)],
    )

    # Chunked prefill of equal-length rows: the second chunk starts at CHUNK > 0. Slots 1..3
    # in order, so the model reads the cache through a view rather than a gather.
    cache = model.allocate_kv_cache(4, 32)
    in_order = torch.tensor([1, 2, 3])
    model(tokens[:, :CHUNK], zeros, in_order, cache)
    logits = model(tokens[:, CHUNK:], zeros + CHUNK, in_order, cache, all_logits=True)
    out["chunked"] = (
        logits.reshape(-1, logits.shape[-1]),
        [(b, p) for b in range(BATCH) for p in range(CHUNK, SEQ)],
    )

    # Fill every slot with unrelated longer sequences first, so stale K/V sit beyond each new
    # prompt: a mask that lets them through would change the logits.
    cache = model.allocate_kv_cache(4, 32)
    junk = (tokens.flip(1)[:1].repeat(4, 2) + 7) % SMALL["vocab_size"]
    model(junk[:, :20], torch.zeros(4, dtype=torch.long), torch.arange(4), cache)

    rows, where = [], []
    for b, n in enumerate(PROMPT_LENS):  # one prefill per request, as the engine does
        rows.append(model(tokens[b : b + 1, :n], zeros[:1], slots[b : b + 1], cache)[0])
        where.append((b, n - 1))
    for k in range(DECODE_STEPS):  # decode: S == 1, a different start position per row
        pos = torch.tensor(PROMPT_LENS) + k
        step = tokens[torch.arange(BATCH), pos][:, None]
        logits = model(step, pos, slots, cache)
        rows.extend(logits)
        where.extend((b, int(pos[b])) for b in range(BATCH))
    out["decode"] = (torch.stack(rows), where)
    return out


def reference_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence transformers forward: [B, S, V] float32."""
    with torch.no_grad():
        return hf_model(tokens).logits.float()


def max_error(result: tuple[torch.Tensor, list], ref: torch.Tensor) -> float:
    logits, where = result
    expected = torch.stack([ref[b, p] for b, p in where])
    assert logits.shape == expected.shape, (logits.shape, expected.shape)
    return (logits - expected).abs().max().item()
