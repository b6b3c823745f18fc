"""The continuous-batching engine, in process, against transformers on a real tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from megatron_coord.engine import InferenceEngine
from megatron_coord.engine.tp_broadcast import NewRequest
from megatron_coord.sampling_params import SamplingParams

EOS = 50256


def make_tiny_checkpoint(path: str, seed: int = 0) -> None:
    """A seeded-random Llama saved by transformers, with the GPT-2 tokenizer beside it
    (another ``seed``: the same model with other weights).

    ``initializer_range=0.5`` gives logits with well-separated maxima, so greedy decoding is
    decided by the model and not by float rounding.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_coord.tokenizer import gpt2_tokenizer

    config = LlamaConfig(
        vocab_size=50257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        bos_token_id=EOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    gpt2_tokenizer().hf_tokenizer.save_pretrained(path)


def hf_greedy(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' own greedy generation (stops after EOS, as ours does)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=EOS
        )[0, len(prompt) :].tolist()
        if EOS in ids:
            ids = ids[: ids.index(EOS) + 1]
        out.append(ids)
    return out


PROMPTS = [[10, 20, 30], [5], [7, 8, 9, 10, 11, 12, 13], [40, 41, 42], [99, 98], [3, 1, 4, 1, 5]]


def _request(rid: int, prompt: list[int], seed: int = 0, **params) -> NewRequest:
    params.setdefault("top_k", 1)
    return NewRequest(rid, prompt, SamplingParams(**params), seed)


def _run(engine: InferenceEngine) -> dict[int, dict]:
    records = {}
    for _ in range(1000):
        if not engine.has_work:
            break
        for record in engine.step().finished:
            (request,) = record["requests"]
            records[request["request_id"]] = request
    assert not engine.has_work
    return records


def test_greedy_matches_transformers_with_continuous_batching(checkpoint, model):
    n = 12
    expected = hf_greedy(checkpoint, PROMPTS, n)
    engine = InferenceEngine(model, max_batch_size=4, max_seq_len=64)
    for rid, prompt in enumerate(PROMPTS):
        engine.add_request(_request(rid, prompt, num_tokens_to_generate=n))
    # Six requests, four slots: the first step admits four and queues two.
    engine.step()
    assert len(engine.active) == 4 and len(engine.waiting) == 2
    records = _run(engine)
    for rid, prompt in enumerate(PROMPTS):
        assert records[rid]["generated_tokens"] == expected[rid], rid
        assert records[rid]["prompt_tokens"] == prompt
        assert records[rid]["status"] == "COMPLETED"
    assert sorted(engine.free_slots) == [0, 1, 2, 3]


def test_stop_conditions(checkpoint, model):
    greedy = hf_greedy(checkpoint, [PROMPTS[0]], 8)[0]
    stop_token = greedy[3]
    engine = InferenceEngine(model, max_batch_size=2, max_seq_len=10)
    engine.add_request(_request(0, PROMPTS[0], num_tokens_to_generate=8, termination_id=stop_token))
    engine.add_request(_request(1, PROMPTS[0], num_tokens_to_generate=50))  # hits max_seq_len
    engine.add_request(_request(2, PROMPTS[0], num_tokens_to_generate=0))
    engine.add_request(_request(3, PROMPTS[0], num_tokens_total=5))
    records = _run(engine)
    assert records[0]["generated_tokens"] == greedy[: greedy.index(stop_token) + 1]
    assert records[0]["finish_reason"] == "stop"
    assert len(records[1]["generated_tokens"]) == 10 - 3
    assert records[1]["finish_reason"] == "length"
    assert records[2]["generated_tokens"] == [] and records[2]["finish_reason"] == "length"
    assert records[3]["generated_tokens"] == greedy[:2]


def test_default_termination_is_eos(model):
    engine = InferenceEngine(model, max_batch_size=1, max_seq_len=64)
    assert engine.default_termination_ids == {EOS}
    engine = InferenceEngine(model, termination_id=7, max_seq_len=64)
    assert engine.default_termination_ids == {7}


def test_invalid_requests_are_refused(model):
    engine = InferenceEngine(model, max_batch_size=1, max_seq_len=8)
    for prompt in ([], [1, 2, 50257], [-1], list(range(8)), "text", [1.5]):
        with pytest.raises(ValueError):
            engine.add_request(_request(0, prompt))
    engine.add_request(_request(0, [1]))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(_request(0, [2]))


def test_abort_waiting_and_running(model):
    engine = InferenceEngine(model, max_batch_size=1, max_seq_len=64)
    engine.add_request(_request(1, [1, 2], num_tokens_to_generate=20))
    engine.add_request(_request(2, [3, 4], num_tokens_to_generate=20))
    engine.step()
    assert engine.abort(2) and engine.abort(1) and not engine.abort(3)
    assert engine.free_slots == [0]
    finished = {r["requests"][0]["request_id"]: r["requests"][0] for r in engine.step().finished}
    assert finished[1]["status"] == finished[2]["status"] == "ABORTED"
    assert finished[1]["finish_reason"] == "abort"
    assert len(finished[1]["generated_tokens"]) == 1 and finished[2]["generated_tokens"] == []
    assert not engine.has_work


def test_log_probs_match_transformers(checkpoint, model):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    engine = InferenceEngine(model, max_batch_size=2, max_seq_len=64)
    prompt = PROMPTS[2]
    engine.add_request(_request(0, prompt, num_tokens_to_generate=5, return_log_probs=True))
    record = _run(engine)[0]
    full = torch.tensor([prompt + record["generated_tokens"]])
    with torch.no_grad():
        lp = torch.log_softmax(hf(full).logits[0], -1)
    expected_gen = [
        lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(record["generated_tokens"])
    ]
    expected_prompt = [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert record["generated_log_probs"] == pytest.approx(expected_gen, abs=1e-4)
    assert record["prompt_log_probs"] == pytest.approx(expected_prompt, abs=1e-4)


def test_streaming_chunks_add_up(model):
    engine = InferenceEngine(model, max_batch_size=2, max_seq_len=64)
    engine.add_request(_request(5, [1, 2, 3], num_tokens_to_generate=9, streaming_interval=2))
    streamed, final = [], None
    while engine.has_work:
        result = engine.step()
        for rid, tokens, extras in result.partial:  # extras: the version spans so far
            assert rid == 5
            streamed += tokens
            generated = len(streamed)
            assert extras["weight_version_spans"] == [[0, generated, "initial"]]
            assert extras["kv_version_spans"] == [[0, 3 + generated - 1, "initial"]]
        if result.finished:
            final = result.finished[0]["requests"][0]["generated_tokens"]
    assert len(streamed) == 8 and streamed == final[: len(streamed)]


def test_seeded_sampling_is_independent_of_batching(model):
    def run(batch_size: int, others: int) -> list[int]:
        engine = InferenceEngine(model, max_batch_size=batch_size, max_seq_len=64)
        for i in range(others):
            engine.add_request(
                _request(100 + i, [i + 1] * (i + 2), seed=i, top_k=0, temperature=1.0)
            )
        engine.add_request(_request(0, [7, 7, 7], seed=1234, top_k=0, temperature=1.5, top_p=0.95))
        return _run(engine)[0]["generated_tokens"]

    alone = run(1, 0)
    assert alone == run(4, 3) == run(2, 5)
    assert len(set(alone)) > 1  # really sampled, not greedy
