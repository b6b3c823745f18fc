"""Issue 23's HTTP fields against a real coordinator and a fake engine: echo and prompt
log-probs, top-N alternatives, vLLM's prompt_logprobs and sampling fields, cached_tokens, the
context check, bounds at the edge, /tokenize and /detokenize, 405's Allow.

The fake engine echoes the prompt and reports a fake model's log-probs (testing/fake_model.py),
the byte tokenizer makes every token one character, so each expected value is computed.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import start_coordinator

from megatron_coord.serving import HTTPServerThread
from megatron_coord.serving.chat_template import render_default_template
from megatron_coord.testing.fake_engine import ByteTokenizer, spawn
from megatron_coord.testing.fake_model import FAKE_BLOCK, fake_log_prob, fake_top_n

MODEL = "fields"
CONTEXT = 64


class Server:
    def __init__(self) -> None:
        self.address, self.process, ready = start_coordinator(1)
        self.engine = spawn(self.address, 0)
        assert ready.wait(60), "the engine did not register"
        self.http = HTTPServerThread(
            self.address,
            tokenizer=ByteTokenizer(),
            model_name=MODEL,
            max_model_len=CONTEXT,
            vocab_size=256,
        ).start()
        self.url = self.http.url
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0)

    def post(self, path: str, **body: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json={"model": MODEL, **body}, timeout=30)

    def close(self) -> None:
        self.http.stop()
        self.engine.kill()
        self.engine.wait()
        self.process.kill()
        self.process.join()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def top(token: int, position: int, n: int) -> dict[str, float]:
    """The alternatives as the completions API shows them: as text, the chosen one included."""
    return {chr(t): lp for t, lp in fake_top_n(token, position, max(n, 1)).items()}


# --------------------------------------------------------------------------- log-probs


def test_echo_with_top_n_logprobs(server: Server) -> None:
    r = server.openai.completions.create(
        model=MODEL, prompt="abcd", max_tokens=3, echo=True, logprobs=2
    )
    choice = r.choices[0]
    assert choice.text == "abcd" + "abc"
    lp = choice.logprobs
    sequence = [ord(c) for c in "abcdabc"]
    assert lp.tokens == list("abcdabc")
    assert lp.text_offset == list(range(7))
    assert lp.token_logprobs == [None] + [fake_log_prob(t, p) for p, t in enumerate(sequence)][1:]
    assert lp.top_logprobs == [None] + [top(t, p, 2) for p, t in enumerate(sequence)][1:]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 3)


def test_echo_for_loglikelihood_as_lm_eval_asks(server: Server) -> None:
    """lm-evaluation-harness: token ids, echo, logprobs=1, max_tokens 1 (and 0, as some
    clients send): the prompt's log-probs, the first null."""
    prompt = [104, 101, 108, 108, 111]
    for max_tokens in (1, 0):
        r = server.openai.completions.create(
            model=MODEL, prompt=[prompt], max_tokens=max_tokens, echo=True, logprobs=1
        )
        lp = r.choices[0].logprobs
        expected = [None] + [fake_log_prob(t, p) for p, t in enumerate(prompt)][1:]
        assert lp.token_logprobs[: len(prompt)] == expected
        assert len(lp.token_logprobs) == len(prompt) + max_tokens
        assert r.choices[0].text == "hello" + "h" * max_tokens
        assert r.usage.completion_tokens == max_tokens
        for tok, alternatives in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
            assert tok == max(alternatives.values())  # lm-eval's is_greedy


def test_generated_top_n_and_chat_logprobs(server: Server) -> None:
    r = server.openai.completions.create(model=MODEL, prompt="xyz", max_tokens=4, logprobs=3)
    generated = [ord(c) for c in "xyzx"]
    lp = r.choices[0].logprobs
    assert lp.tokens == list("xyzx")
    assert lp.token_logprobs == [fake_log_prob(t, 3 + j) for j, t in enumerate(generated)]
    assert lp.top_logprobs == [top(t, 3 + j, 3) for j, t in enumerate(generated)]

    messages = [{"role": "user", "content": "hi"}]
    prompt = render_default_template(messages)
    chat = server.openai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, logprobs=True, top_logprobs=2
    )
    start = len(prompt)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == list(prompt[:3])
    for j, entry in enumerate(content):
        t = ord(prompt[j])
        assert entry.logprob == fake_log_prob(t, start + j)
        assert entry.bytes == [t]
        assert [(a.token, a.logprob) for a in entry.top_logprobs] == list(
            top(t, start + j, 2).items()
        )


def test_vllm_prompt_logprobs(server: Server) -> None:
    r = server.post("/v1/completions", prompt="abc", max_tokens=1, prompt_logprobs=1).json()
    assert r["choices"][0]["prompt_logprobs"] == [
        None,
        {"98": {"logprob": fake_log_prob(98, 1), "rank": 1, "decoded_token": "b"}},
        {"99": {"logprob": fake_log_prob(99, 2), "rank": 1, "decoded_token": "c"}},
    ]
    # Chat: once, at the top; prompt_logprobs=0 is the prompt's tokens alone.
    r = server.post(
        "/v1/chat/completions",
        messages=[{"role": "user", "content": "q"}],
        max_tokens=1,
        prompt_logprobs=2,
    ).json()
    prompt = render_default_template([{"role": "user", "content": "q"}])
    entries = r["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt)
    t = ord(prompt[1])
    assert entries[1] == {
        str(t): {"logprob": fake_log_prob(t, 1), "rank": 1, "decoded_token": prompt[1]},
        str(t + 1): {"logprob": fake_log_prob(t, 1) - 2, "rank": 2, "decoded_token": chr(t + 1)},
    }


def test_streamed_echo_and_logprobs_come_whole(server: Server) -> None:
    chunks = list(
        server.openai.completions.create(
            model=MODEL, prompt="ab", max_tokens=2, echo=True, logprobs=0, stream=True
        )
    )
    texts = [c.choices[0].text for c in chunks]
    assert texts == ["abab", ""]
    assert chunks[0].choices[0].logprobs.tokens == list("abab")
    assert chunks[-1].choices[0].finish_reason == "length"


# --------------------------------------------------------------------------- sampling fields


def test_stop_token_ids_end_with_the_token(server: Server) -> None:
    r = server.openai.completions.create(
        model=MODEL, prompt="abcdef", max_tokens=10, extra_body={"stop_token_ids": [ord("c")]}
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("abc", "stop")


def test_end_of_text_ignore_eos_and_min_tokens(server: Server) -> None:
    """The byte tokenizer's end-of-text is byte 0: the echo reaches it and stops there (cut
    from the text); ignore_eos generates the whole budget; min_tokens masks it (the fake
    engine takes the next id, byte 1) until enough tokens were generated."""
    prompt = "ab\x00cd"
    stopped = server.openai.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("ab", "stop")
    assert stopped.usage.completion_tokens == 3
    ignored = server.openai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert ignored.choices[0].finish_reason == "length"
    assert ignored.usage.completion_tokens == 8
    masked = server.openai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, extra_body={"min_tokens": 4}
    )
    assert masked.choices[0].text == "ab\x01cdab"  # byte 0 masked at 3, ends at the next one
    assert masked.choices[0].finish_reason == "stop"


def test_include_stop_str_in_output(server: Server) -> None:
    r = server.openai.completions.create(
        model=MODEL,
        prompt="hello world",
        max_tokens=20,
        stop="wor",
        extra_body={"include_stop_str_in_output": True},
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("hello wor", "stop")


def test_every_vllm_field_is_accepted(server: Server) -> None:
    fields = {
        "top_k": 5,
        "min_p": 0.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.2,
        "logit_bias": {"97": 100, "3": -100.0},
        "ignore_eos": True,
        "min_tokens": 2,
        "skip_special_tokens": False,
        "seed": 7,
    }
    r = server.post("/v1/completions", prompt="ok", max_tokens=3, **fields)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "oko"


def test_best_of_returns_the_best_n(server: Server) -> None:
    r = server.openai.completions.create(model=MODEL, prompt="ab", max_tokens=3, n=1, best_of=3)
    assert [c.index for c in r.choices] == [0]
    assert r.choices[0].text == "aba"
    assert r.usage.completion_tokens == 9  # every candidate is billed, as OpenAI does


# --------------------------------------------------------------------------- usage, context


def test_cached_tokens_in_usage(server: Server) -> None:
    prompt = "a prompt the engine has not seen before"
    first = server.openai.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    again = server.openai.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    expected = (len(prompt) - 1) // FAKE_BLOCK * FAKE_BLOCK
    assert again.usage.prompt_tokens_details.cached_tokens == expected


def test_prompt_past_the_context_is_400_naming_both(server: Server) -> None:
    prompt = "x" * 40
    with pytest.raises(openai.BadRequestError) as info:
        server.openai.completions.create(model=MODEL, prompt=prompt, max_tokens=30)
    body = info.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    for number in ("64", "40", "30", "70"):
        assert number in body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # token ids: counted as they are
        server.openai.completions.create(model=MODEL, prompt=[120] * 60, max_tokens=5)
    assert "60" in info.value.body["message"]
    # max_tokens beyond any prompt: refused by its bound, in the schema too.
    with pytest.raises(openai.BadRequestError) as info:
        server.openai.completions.create(model=MODEL, prompt="x", max_tokens=5000)
    message = info.value.body["message"]
    assert info.value.body["param"] == "max_tokens"
    assert "5000" in message and "64" in message and message.count(";") == 0  # one error
    # Chat without max_tokens: the default budget shrinks to what the context leaves.
    long = "y" * 30
    r = server.openai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": long}]
    )
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_k": 2**64}, "top_k"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"prompt": [1, 2**64]}, "prompt"),
        ({"prompt": [1, 256]}, "prompt"),
        ({"seed": 2**64}, "seed"),
        ({"min_tokens": 2**63}, "min_tokens"),
        ({"stop_token_ids": [2**70]}, "stop_token_ids"),
        ({"logit_bias": {"256": 1}}, "logit_bias"),
        ({"logit_bias": {str(2**64): 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"temperature": 1e400}, "temperature"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"best_of": 17}, "best_of"),
        ({"suffix": "tail"}, "suffix"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_out_of_bounds_fields_are_400_naming_the_field(
    server: Server, fields: dict, param: str
) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, **fields}
    raw = httpx.post(
        f"{server.url}/v1/completions",
        content=_json(body),
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400, raw.text
    assert raw.json()["error"]["param"] == param


def test_a_bound_error_says_just_that(server: Server) -> None:
    """A union (prompt: text or token lists; an integer: an int or an integral float) does
    not bury the one error under every member that did not match."""
    error = server.post("/v1/completions", prompt=[1, 300], max_tokens=1).json()["error"]
    assert error["message"] == "prompt.1: Input should be less than or equal to 255"
    error = server.post("/v1/completions", prompt="x", n=0).json()["error"]
    assert error["message"] == "n: Input should be greater than or equal to 1"


def _json(body: dict) -> bytes:
    """JSON as a client could send it: 1e400 stays a literal (json.dumps would write inf)."""
    import json

    text = json.dumps(body)
    return text.replace("Infinity", "1e400").encode()


def test_unknown_model_and_wrong_method(server: Server) -> None:
    r = server.post("/v1/completions", **{"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = httpx.delete(f"{server.url}/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


# --------------------------------------------------------------------------- tokenize


def test_tokenize_and_detokenize_as_vllm_serves_them(server: Server) -> None:
    r = server.post("/tokenize", prompt="héllo", return_token_strs=True).json()
    tokens = list("héllo".encode())
    assert r["count"] == len(tokens) and r["tokens"] == tokens
    assert r["max_model_len"] == CONTEXT and len(r["token_strs"]) == len(tokens)
    assert server.post("/detokenize", tokens=tokens).json() == {"prompt": "héllo"}
    # Chat messages count exactly what the chat endpoint's usage says.
    messages = [{"role": "user", "content": "count me"}]
    counted = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    chat = server.openai.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert counted["count"] == chat.usage.prompt_tokens
    assert server.post("/detokenize", tokens=[256]).status_code == 400
    assert server.post("/tokenize", **{"model": "other", "prompt": "x"}).status_code == 404
