"""Streaming end to end with a REAL engine: InferenceClient -> coordinator -> EngineServer with
the continuous-batching engine on a tiny Llama checkpoint (GPT-2 tokenizer, multi-byte text)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import ThreadedCoordinator

from megatron_coord import InferenceClient
from megatron_coord.engine import InferenceEngine
from megatron_coord.engine.server import EngineServer
from megatron_coord.parallel_state import single_process_state

PROMPT = "Grüße, 世界! naïve café 🙂"


@dataclass
class Serving:
    """A coordinator (thread) and one real replica (EngineServer looping in a thread)."""

    address: str
    server: EngineServer
    coord: ThreadedCoordinator
    thread: threading.Thread


@pytest.fixture
def serving(model, tokenizer, request) -> Iterator[Serving]:
    """``@pytest.mark.parametrize("serving", [max_batch_size], indirect=True)``; default 4."""
    max_batch_size = getattr(request, "param", 4)
    coord = ThreadedCoordinator(1, tokenizer, routing="least_loaded")
    engine = InferenceEngine(model, max_batch_size=max_batch_size, max_seq_len=128)
    server = EngineServer(
        engine,
        single_process_state(),
        coord.address,
        idle_timeout_s=0.05,
        heartbeat_interval_s=0.05,
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert coord.ready.wait(30)
    yield Serving(coord.address, server, coord, thread)
    server.request_shutdown()
    thread.join(30)
    server.close()
    if not coord.thread.is_alive():  # every test ends with a STOP round trip
        coord.join()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 120))


async def _collect(address: str, prompt, params: dict) -> tuple[list[dict], dict, dict]:
    """(partials, final record of the stream, record of the same request without streaming)."""
    client = InferenceClient(address)
    await client.start()
    items = [item async for item in client.add_request_streaming(prompt, params)]
    plain = {k: v for k, v in params.items() if k != "streaming_interval"}
    unary = await client.add_request(prompt, plain)
    await client.stop_engines()
    client.stop()
    return items[:-1], items[-1], unary


def test_partials_concatenate_to_the_final_text(serving, tokenizer):
    params = {"top_k": 1, "num_tokens_to_generate": 40, "streaming_interval": 3}
    partials, final, unary = run(_collect(serving.address, PROMPT, params))
    (request,) = final["requests"]
    tokens = request["generated_tokens"]
    assert request["status"] == "COMPLETED"
    assert all("requests" not in p for p in partials)
    assert [t for p in partials for t in p["tokens"]] == tokens
    assert "".join(p["text"] for p in partials) == request["generated_text"]
    assert request["generated_text"] == tokenizer.detokenize(tokens)
    # Streaming changes nothing about the result (greedy).
    assert unary["requests"][0]["generated_tokens"] == tokens
    # At most every streaming_interval steps: every chunk but the final one carries 3 tokens.
    assert [len(p["tokens"]) for p in partials[:-1]] == [3] * (len(partials) - 1)
    assert 1 <= len(partials[-1]["tokens"]) <= 3 or len(tokens) % 3 == 0
    # A chunk never ends inside a multi-byte character.
    for partial in partials:
        assert "\ufffd" not in partial["text"] or "\ufffd" in request["generated_text"]


def test_token_prompt_streams_every_step(serving, tokenizer):
    prompt = tokenizer.tokenize(PROMPT)
    params = {"top_k": 1, "num_tokens_to_generate": 12, "streaming_interval": 1}
    partials, final, unary = run(_collect(serving.address, prompt, params))
    (request,) = final["requests"]
    assert request["prompt_tokens"] == prompt and request["prompt"] == PROMPT
    assert [t for p in partials for t in p["tokens"]] == request["generated_tokens"]
    assert "".join(p["text"] for p in partials) == request["generated_text"]
    # One token per step; the final step's token comes in the tail partial before the record.
    assert all(len(p["tokens"]) == 1 for p in partials)
    assert unary["requests"][0]["generated_tokens"] == request["generated_tokens"]
    # The HEARTBEAT's processed_tokens (least-loaded routing's correction) counts prompt tokens
    # prefilled plus tokens generated, for both requests.
    work = 2 * (len(prompt) + len(request["generated_tokens"]))
    assert serving.server.load_report()["processed_tokens"] == work


@pytest.mark.parametrize("skip", [True, False])
def test_partials_carry_log_probs_and_special_tokens_as_asked(serving, tokenizer, skip):
    eos = tokenizer.eod
    params = {
        "top_k": 1,
        "num_tokens_to_generate": 12,
        "streaming_interval": 2,
        "return_log_probs": True,
        "top_n_logprobs": 2,
        "logit_bias": {eos: 100.0},
        "min_tokens": 5,  # five tokens, then the (all but certain) end-of-text
        "skip_special_tokens": skip,
    }
    partials, final, unary = run(_collect(serving.address, PROMPT, params))
    (request,) = final["requests"]
    tokens = request["generated_tokens"]
    assert len(tokens) == 6 and tokens[-1] == eos and request["finish_reason"] == "stop"
    assert [t for p in partials for t in p["tokens"]] == tokens
    assert "".join(p["text"] for p in partials) == request["generated_text"]
    text = tokenizer.detokenize(tokens)
    assert text.endswith("<|endoftext|>")
    assert request["generated_text"] == (text.removesuffix("<|endoftext|>") if skip else text)
    for name in ("generated_log_probs", "generated_top_n_logprobs"):
        assert [v for p in partials for v in p[name]] == request[name]
        assert unary["requests"][0][name] == request[name]
    # Top-N is of the raw distribution: the greedy picks top it, the biased end-of-text not.
    top = request["generated_top_n_logprobs"]
    assert [list(d)[0] for d in top[:5]] == tokens[:5] and list(top[5])[0] != eos
