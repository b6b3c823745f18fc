"""Per-request sampling: greedy, temperature, top-k, top-p, seeds and log-probs."""

from __future__ import annotations

import torch

from megatron_coord.engine.sampling import (
    SamplingState,
    choose_seed,
    filter_logits,
    prompt_seed,
    sample,
)


def _logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax_and_ignores_seed():
    logits = _logits()
    for state in (SamplingState(top_k=1, seed=1), SamplingState(temperature=0.0, seed=2)):
        tokens, _ = sample(logits[:1], [state], [False])
        assert tokens == [int(logits[0].argmax())]


def test_same_seed_same_tokens_different_seed_differs():
    logits = _logits(1, 1000)
    runs = []
    for seed in (7, 7, 8):
        state = SamplingState(temperature=5.0, seed=seed)
        runs.append([sample(logits, [state], [False])[0][0] for _ in range(20)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_sampling_is_independent_of_batch_company():
    logits = _logits(3, 200)
    alone = [sample(logits[1:2], [SamplingState(temperature=2.0, seed=3)], [False])[0][0]]
    states = [SamplingState(temperature=2.0, seed=s) for s in (11, 3, 12)]
    batch = sample(logits, states, [False] * 3)[0]
    assert batch[1] == alone[0]


def test_top_k_only_draws_from_the_k_best():
    logits = _logits(1, 100)[0]
    best = set(torch.topk(logits, 3).indices.tolist())
    state = SamplingState(temperature=100.0, top_k=3, seed=0)
    drawn = {sample(logits[None], [state], [False])[0][0] for _ in range(300)}
    assert drawn <= best and len(drawn) == 3


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, 0, 0.7)).tolist()
    assert kept == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, 0, 0.4)).tolist()
    assert kept == [True, False, False, False]
    state = SamplingState(temperature=1.0, top_p=0.7, seed=1)
    drawn = {sample(logits[None], [state], [False])[0][0] for _ in range(300)}
    assert drawn == {0, 1}


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    state = SamplingState(temperature=1.0, seed=5)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[sample(torch.log(probs)[None], [state], [False])[0][0]] += 1
    freq = [c / 3000 for c in counts]
    assert all(abs(f - p) < 0.05 for f, p in zip(freq, probs.tolist(), strict=True))


def test_log_probs_are_of_the_raw_distribution():
    logits = _logits(2, 30)
    states = [SamplingState(top_k=1), SamplingState(temperature=0.3, seed=1)]
    tokens, log_probs = sample(logits, states, [True, False])
    expected = torch.log_softmax(logits[0], -1)[tokens[0]].item()
    assert abs(log_probs[0] - expected) < 1e-6
    assert log_probs[1] is None


def test_seed_choice():
    assert choose_seed(42, [1, 2], deterministic=True) == 42
    assert choose_seed(-1, [1], deterministic=False) == 2**64 - 1
    assert choose_seed(None, [1, 2], True) == prompt_seed([1, 2]) == choose_seed(None, [1, 2], True)
    assert prompt_seed([1, 2]) != prompt_seed([2, 1])
    assert choose_seed(None, [1, 2], False) != choose_seed(None, [1, 2], False)


def _reference_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Full-sort top-k/top-p (the textbook version) to check the partial-top-k shortcut."""
    if 0 < top_k < logits.numel():
        kth = torch.sort(logits, descending=True).values[top_k - 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        values, order = torch.sort(torch.softmax(logits, -1), descending=True)
        drop = (torch.cumsum(values, -1) - values) > top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def test_nucleus_shortcut_matches_full_sort():
    gen = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 8.0):  # flat (full-sort fallback) to peaked (shortcut)
        for top_k, top_p in ((0, 0.9), (0, 0.3), (50, 0.8), (3000, 0.95), (0, 0.999)):
            logits = torch.randn(50257, generator=gen) * scale
            got = torch.isfinite(filter_logits(logits, top_k, top_p))
            want = torch.isfinite(_reference_filter(logits, top_k, top_p))
            assert torch.equal(got, want), (scale, top_k, top_p)
