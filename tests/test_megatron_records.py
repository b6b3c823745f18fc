"""What the coordinator makes of an engine record of ours for each client: generated text that
honours skip_special_tokens, and for Megatron's clients records their own classes accept (top-N
dicts keyed by token text, 0.16's fields only, 0.19's num_cached_tokens)."""

from __future__ import annotations

import msgpack
import msgspec
import pytest

from megatron_coord.coordinator.dialects import FIELDS_016, FIELDS_019, flat_record, record_016
from megatron_coord.coordinator.text import TextCodec
from megatron_coord.tokenizer import gpt2_tokenizer

EOS = 50256


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec(gpt2_tokenizer())


def _record(**extra) -> dict:
    hello = gpt2_tokenizer().tokenize(" Hello world")
    request = {
        "request_id": 3,
        "prompt": None,
        "prompt_tokens": [EOS, *hello],
        "generated_tokens": [*hello, EOS],
        "generated_length": len(hello) + 1,
        "generated_log_probs": [-0.5] * (len(hello) + 1),
        "prompt_log_probs": [-1.0] * len(hello),
        "generated_top_n_logprobs": [{EOS: -0.1, hello[0]: -2.5}] * (len(hello) + 1),
        "prompt_top_n_logprobs": [{hello[1]: -0.2}] * len(hello),
        "cached_tokens": 16,
        "status": "COMPLETED",
        "finish_reason": "stop",
        "data_parallel_rank": 0,
        **extra,
    }
    # As the coordinator gets it: msgpack from the engine (integer keys survive msgspec).
    return msgspec.msgpack.decode(msgspec.msgpack.encode({"requests": [request]}))


def test_generated_text_skips_special_tokens_unless_asked(codec):
    default, keep = _record(), _record(skip_special_tokens=False)
    assert codec.detokenize_records([default, keep], {}) == {}
    assert default["requests"][0]["generated_text"] == " Hello world"
    assert keep["requests"][0]["generated_text"] == " Hello world<|endoftext|>"
    for record in (default, keep):  # a prompt decoded from its tokens keeps them
        assert record["requests"][0]["prompt"] == "<|endoftext|> Hello world"
    assert codec.detokenize([EOS, 31373]) == "hello"
    assert codec.detokenize_keeping_special([EOS]) == "<|endoftext|>"
    assert codec.token_texts([EOS, 31373]) == ["<|endoftext|>", "hello"]


def test_a_016_client_deserializes_our_record_with_token_text_keys(codec):
    from megatron.core.inference.inference_request import DynamicInferenceRequestRecord

    record = _record()
    codec.detokenize_records([record], {})
    wire = msgpack.packb([4, 7, record_016(record, codec.token_texts)], use_bin_type=True)
    reply = msgpack.unpackb(wire, raw=False)[2]  # as 0.16's client: string map keys only
    (request,) = reply["requests"]
    assert set(request) <= FIELDS_016
    parsed = DynamicInferenceRequestRecord.deserialize(reply).requests[0]
    assert parsed.generated_text == " Hello world"
    assert parsed.generated_top_n_logprobs[0] == {"<|endoftext|>": -0.1, " Hello": -2.5}
    assert parsed.prompt_top_n_logprobs[0] == {" world": -0.2}


def test_a_019_client_gets_num_cached_tokens_and_token_text_keys(codec):
    flat = flat_record(_record(), codec.token_texts)
    assert set(flat) <= FIELDS_019
    assert flat["num_cached_tokens"] == 16
    assert list(flat["generated_top_n_logprobs"][0]) == ["<|endoftext|>", " Hello"]
    msgpack.unpackb(msgpack.packb(flat, use_bin_type=True), raw=False)  # no integer key left
