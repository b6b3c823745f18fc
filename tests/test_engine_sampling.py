"""Each sampling field through the engine on the tiny checkpoint, as its definition says:
min_tokens with the EOS made all but certain, logit_bias of +100, stop_token_ids, ignore_eos;
penalized sampling independent of its batch and of a requeue."""

from __future__ import annotations

import pytest
from test_engine import EOS, _request, _run

from megatron_coord.engine import InferenceEngine

PROMPT = [10, 20, 30]
CERTAIN_EOS = {EOS: 100.0}


def _one(model, **params) -> dict:
    engine = InferenceEngine(model, max_batch_size=2, max_seq_len=64)
    engine.add_request(_request(0, PROMPT, **params))
    return _run(engine)[0]


@pytest.mark.parametrize("sampled", [False, True])
def test_min_tokens_holds_back_a_certain_eos(model, sampled):
    extra = {"top_k": 0, "temperature": 1.0} if sampled else {}
    assert _one(model, logit_bias=CERTAIN_EOS, **extra)["generated_tokens"] == [EOS]
    record = _one(model, logit_bias=CERTAIN_EOS, min_tokens=5, **extra)
    assert len(record["generated_tokens"]) == 6 and record["generated_tokens"][5] == EOS
    assert EOS not in record["generated_tokens"][:5]
    assert record["finish_reason"] == "stop"
    # min_tokens holds back stop_token_ids too.
    stops = {7: 100.0}
    record = _one(model, logit_bias=stops, stop_token_ids=[7], min_tokens=2, **extra)
    assert record["generated_tokens"][2] == 7 and 7 not in record["generated_tokens"][:2]


def test_logit_bias_of_100_makes_one_token_always_chosen(model):
    for params in ({}, {"top_k": 0, "temperature": 1.5}, {"top_k": 0, "top_p": 0.5}):
        record = _one(model, logit_bias={4242: 100.0}, num_tokens_to_generate=8, **params)
        assert record["generated_tokens"] == [4242] * 8


def test_stop_token_ids_end_the_request_with_stop(model):
    greedy = _one(model, num_tokens_to_generate=8, termination_id=-1)["generated_tokens"]
    stop = greedy[3]
    record = _one(model, num_tokens_to_generate=8, termination_id=-1, stop_token_ids=[stop, 1])
    assert record["generated_tokens"] == greedy[: greedy.index(stop) + 1]
    assert record["finish_reason"] == "stop"


def test_ignore_eos_runs_to_the_budget(model):
    record = _one(model, logit_bias=CERTAIN_EOS, ignore_eos=True, num_tokens_to_generate=7)
    assert record["generated_tokens"] == [EOS] * 7 and record["finish_reason"] == "length"
    # ... but stops at its stop_token_ids.
    record = _one(
        model, logit_bias={9: 100.0}, ignore_eos=True, stop_token_ids=[9], num_tokens_to_generate=7
    )
    assert record["generated_tokens"] == [9] and record["finish_reason"] == "stop"


def _penalized_greedy_by_hand(checkpoint: str, prompt: list[int], n: int, p: dict) -> list[int]:
    """Greedy decoding over transformers' logits with the definitions applied by hand."""
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].tolist()
        for token, bias in p["logit_bias"].items():
            logits[token] += bias
        for token in set(prompt + out):  # repetition: prompt and generated
            r = p["repetition_penalty"]
            logits[token] = logits[token] / r if logits[token] > 0 else logits[token] * r
        for token in set(out):  # frequency and presence: generated only
            logits[token] -= p["frequency_penalty"] * out.count(token) + p["presence_penalty"]
        out.append(max(range(len(logits)), key=logits.__getitem__))
    return out


def test_penalties_follow_their_definitions(checkpoint, model):
    # A bias that makes greedy repeat one token, then penalties that must break the repeats.
    biased = {"logit_bias": {14996: 10.0}, "num_tokens_to_generate": 12, "termination_id": -1}
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3}
    repeats = _one(model, **biased)["generated_tokens"]
    assert len(repeats) - len(set(repeats)) >= 2
    got = _one(model, **biased, **penalties)["generated_tokens"]
    assert got == _penalized_greedy_by_hand(checkpoint, PROMPT, 12, {**biased, **penalties})
    assert got != repeats


def test_penalized_sampling_is_independent_of_the_batch(model):
    penalized = {
        "top_k": 0,
        "temperature": 0.9,
        "repetition_penalty": 1.8,
        "presence_penalty": 1.0,
        "frequency_penalty": 1.0,
        "logit_bias": {14996: 10.0},
        "num_tokens_to_generate": 12,
        "termination_id": -1,
    }

    def run(others: int, batch: int) -> list[int]:
        engine = InferenceEngine(model, max_batch_size=batch, max_seq_len=64)
        for i in range(others):
            engine.add_request(_request(10 + i, [i + 1] * 3, seed=i, top_k=0, min_p=0.1))
        engine.add_request(_request(0, PROMPT, seed=5, **penalized))
        return _run(engine)[0]["generated_tokens"]

    alone = run(0, 1)
    assert alone == run(3, 4) == run(5, 2)
    assert len(set(alone)) > 1


def test_a_requeued_request_samples_the_same_tokens_again(model):
    params = {"top_k": 0, "frequency_penalty": 0.7, "num_tokens_to_generate": 6, "seed": 3}
    engine = InferenceEngine(model, max_batch_size=2, max_seq_len=64)
    engine.add_request(_request(0, PROMPT, **params))
    engine.step()
    engine.step()
    engine.requeue(list(engine.active.values()))  # as after an out-of-memory step
    again = _run(engine)[0]["generated_tokens"]
    assert again == _one(model, **params)["generated_tokens"]
