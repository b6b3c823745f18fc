"""Log-probabilities the engine reports: of the model's raw distribution (log-softmax of the
unmodified logits, as Megatron reports them), for sampled tokens and for prompt positions,
with the top-N alternatives per position when asked.

Prompt scores need the logits of every prompt position: ``vocab x length`` floats, 200 MB for a
1,000-token prompt over a 50k vocabulary. ``prompt_scores`` therefore turns the final hidden
states into logits a chunk of positions at a time (at most ``CHUNK_ELEMENTS`` logits at once)
and keeps only what it reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 24  # logits held at once by prompt_scores: 64 MiB of float32


def top_n_dicts(values: list[list[float]], ids: list[list[int]], n: int) -> list[dict[int, float]]:
    """Per position, ``{token id: log-prob}`` of the ``n`` likeliest, in descending order."""
    return [dict(zip(i[:n], v[:n], strict=True)) for v, i in zip(values, ids, strict=True)]


def raw_log_probs(
    logits: torch.Tensor, chosen: torch.Tensor, want: list[bool], top_ns: list[int]
) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """Per row of ``logits`` [B, V]: the log-prob of its ``chosen`` token (where ``want``) and
    its top-``top_ns[row]`` alternatives (where > 0); None elsewhere."""
    b = len(want)
    log_probs: list[float | None] = [None] * b
    top_n: list[dict[int, float] | None] = [None] * b
    rows = [i for i in range(b) if want[i] or top_ns[i]]
    if not rows:
        return log_probs, top_n
    if len(rows) == b:
        lp, picked = torch.log_softmax(logits, dim=-1), chosen
    else:
        index = torch.tensor(rows, device=logits.device)
        lp, picked = torch.log_softmax(logits[index], dim=-1), chosen[index]
    values = lp.gather(1, picked[:, None])[:, 0].tolist()
    n = min(max(top_ns[i] for i in rows), lp.shape[-1])
    if n:
        top = torch.topk(lp, n, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    for j, row in enumerate(rows):
        if want[row]:
            log_probs[row] = values[j]
        if top_ns[row]:
            top_n[row] = top_n_dicts([top_values[j]], [top_ids[j]], top_ns[row])[0]
    return log_probs, top_n


@dataclass
class PromptScores:
    """What one prefill reports per row, and the logits its first token is sampled from."""

    log_probs: list[list[float]]  # per row: log p(prompt[i] | prompt[:i]) for i = 1..n-1
    top_n: list[list[dict[int, float]] | None]  # per row (where asked): positions 1..n-1
    last_logits: torch.Tensor  # [B, V] at each row's last position


def prompt_scores(
    output: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    prompts: torch.Tensor,
    top_ns: list[int],
    vocab_size: int,
) -> PromptScores:
    """Score whole prompts from their final hidden states ``hidden`` [B, n, H].

    ``output`` is the model's output layer (hidden -> float32 logits; collective under tensor
    parallelism: every rank calls it as often, on the same shapes). ``prompts`` [B, n] holds the
    prompt tokens from position 0.
    """
    b, n = prompts.shape
    chunk = max(1, CHUNK_ELEMENTS // (b * vocab_size))
    scored = n - 1  # positions 0..n-2 predict tokens 1..n-1; n-1 predicts the first new token
    n_top = min(max(top_ns, default=0), vocab_size)
    chosen_parts: list[torch.Tensor] = []
    top_values: list[list[list[float]]] = [[] for _ in range(b)]
    top_ids: list[list[list[int]]] = [[] for _ in range(b)]
    last_logits = None
    start = 0
    while start < n:
        logits = output(hidden[:, start : start + chunk])
        width = logits.shape[1]
        if start + width == n:  # the chunk holding the last position
            last_logits = logits[:, -1].clone()
        end = min(start + width, scored)
        if end > start:
            # (log_softmax is one fused kernel: faster than logit - logsumexp on CPU)
            lp = torch.log_softmax(logits[:, : end - start], dim=-1)
            targets = prompts[:, start + 1 : end + 1, None].to(lp.device)
            chosen_parts.append(lp.gather(2, targets)[..., 0])
            if n_top:
                top = torch.topk(lp, n_top, dim=-1)
                values, ids = top.values.tolist(), top.indices.tolist()
                for row, (v, i) in enumerate(zip(values, ids, strict=True)):
                    top_values[row] += v
                    top_ids[row] += i
        start += width
    assert last_logits is not None
    chosen = torch.cat(chosen_parts, dim=1).tolist() if chosen_parts else [[] for _ in range(b)]
    top_n: list[list[dict[int, float]] | None] = [
        top_n_dicts(top_values[row], top_ids[row], k) if k else None for row, k in enumerate(top_ns)
    ]
    return PromptScores(chosen, top_n, last_logits)
