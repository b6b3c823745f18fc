"""Coordinator-side failures as HTTP clients see them, against a scripted coordinator.

The real coordinator cannot be made to say "no engine", "overloaded" or "engine failed halfway
through a stream" on demand, so a small ROUTER on a thread speaks the coordinator's side of the
wire protocol and answers each prompt as the test scripts it. The HTTP server and the openai
client are the real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import msgspec
import openai
import pytest
import zmq

from megatron_coord.protocol import Headers
from megatron_coord.serving import HTTPServerThread

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


SCRIPTS = (
    "no_engine",
    "overloaded",
    "invalid_request",
    "engine_failed",
    "midstream",
    "eod_reply",
    "logprobs",
    "gpt2_eos",
)


class ScriptedCoordinator:
    """Answers CONNECT, STATS and SUBMIT_REQUEST; the prompt text picks the answer."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.alive = [True, True]
        self.aborted: list[int] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        """Only this thread touches the socket, closing it too: a zmq socket closed by another
        thread while this one polls it is a use-after-free in libzmq (it crashed pytest)."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.stopping.is_set():
            if poller.poll(20):
                identity, frame = self.socket.recv_multipart()
                self._answer(identity, _decode(frame))
        self.socket.close(0)

    def _send(self, identity: bytes, *message: object) -> None:
        self.socket.send_multipart([identity, _encode(list(message))])

    def _answer(self, identity: bytes, message: list) -> None:
        header = message[0]
        if header == Headers.CONNECT:
            self._send(identity, Headers.CONNECT_ACK)
        elif header == Headers.STATS:
            engines = [
                {"data_parallel_rank": r, "alive": a, "outstanding_requests": 0}
                for r, a in enumerate(self.alive)
            ]
            stats = {"engines": engines, "requests_in_flight": 0, "clients": 1}
            self._send(identity, Headers.STATS, stats)
        elif header == Headers.ABORT:
            self.aborted.append(message[1])
        elif header == Headers.SUBMIT_REQUEST:
            self._submit(identity, *message[1:])

    def _submit(self, identity: bytes, request_id: int, text: str, params: dict) -> None:
        # The first script name found in the prompt picks the answer (chat prompts arrive
        # wrapped in a template).
        prompt = next((name for name in SCRIPTS if name in text), None)
        if prompt in ("no_engine", "overloaded", "invalid_request", "engine_failed"):
            self._send(identity, Headers.ERROR, request_id, prompt, f"scripted {prompt}")
        elif prompt == "midstream":
            self._send(identity, Headers.PARTIAL_REPLY, request_id, [104], "h")
            self._send(identity, Headers.PARTIAL_REPLY, request_id, [105], "i")
            self._send(identity, Headers.ERROR, request_id, "engine_failed", "replica died")
        elif prompt == "eod_reply":
            # An answer ending in the end-of-text token: its text must not reach the client.
            request = {
                "prompt_tokens": [1, 2],
                "generated_tokens": [7, 8, 0],
                "generated_text": "ok\x00",
                "finish_reason": "stop",
            }
            self._send(identity, Headers.ENGINE_REPLY, request_id, {"requests": [request]})
        elif prompt == "logprobs":
            request = {
                "prompt_tokens": [1, 2, 3],
                "generated_tokens": [104, 105, 33, 0],
                "generated_log_probs": [-0.5, -1.0, -2.0, -0.25],
                "generated_text": "hi!\x00",
                "finish_reason": "stop",
            }
            self._send(identity, Headers.ENGINE_REPLY, request_id, {"requests": [request]})
        elif prompt == "gpt2_eos":
            request = {
                "prompt_tokens": [1],
                "generated_tokens": [7, 50256],
                "generated_text": "fine<|endoftext|>",
                "finish_reason": "stop",
            }
            self._send(identity, Headers.ENGINE_REPLY, request_id, {"requests": [request]})
        # anything else: never answered (the HTTP client will hang up)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the scripted coordinator did not stop"
        self.context.term()


class EodTokenizer:
    """Megatron-style tokenizer whose end-of-text id 0 is the text "\\x00"."""

    eod = 0

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids: list[int]) -> str:
        return bytes(ids).decode()


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedCoordinator, HTTPServerThread, openai.OpenAI]]:
    coordinator = ScriptedCoordinator()
    server = HTTPServerThread(coordinator.address, tokenizer=EodTokenizer(), model_name="m")
    server.start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    yield coordinator, server, client
    server.stop()
    coordinator.close()


@pytest.mark.parametrize(
    ("prompt", "error", "status"),
    [
        ("no_engine", openai.InternalServerError, 503),
        ("overloaded", openai.RateLimitError, 429),
        ("invalid_request", openai.BadRequestError, 400),
        ("engine_failed", openai.InternalServerError, 500),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_coordinator_errors_become_http_statuses(scripted, prompt, error, status, stream) -> None:
    """Refusals before the first token get a real status, streamed or not."""
    _, _, client = scripted
    with pytest.raises(error) as info:
        result = client.completions.create(model="m", prompt=prompt, max_tokens=2, stream=stream)
        list(result) if stream else None
    assert info.value.status_code == status
    assert info.value.body["code"] == prompt
    assert info.value.body["message"] == f"scripted {prompt}"


def test_error_after_streaming_started_arrives_in_the_stream(scripted) -> None:
    _, _, client = scripted
    stream = client.completions.create(model="m", prompt="midstream", max_tokens=5, stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="replica died"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert "".join(texts) == "hi"


def test_end_of_text_token_is_not_returned(scripted) -> None:
    _, _, client = scripted
    r = client.completions.create(model="m", prompt="eod_reply", max_tokens=5)
    assert r.choices[0].text == "ok"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 3)


def test_health_fails_when_no_replica_is_alive(scripted) -> None:
    coordinator, server, _ = scripted
    assert httpx.get(f"{server.url}/health").json()["replicas_alive"] == 2
    coordinator.alive = [False, True]
    assert httpx.get(f"{server.url}/health").json() == {
        "status": "ok",
        "replicas": 2,
        "replicas_alive": 1,
    }
    coordinator.alive = [False, False]
    try:
        r = httpx.get(f"{server.url}/health")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_engine"
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "megatron_coord_replicas_alive 0.0" in metrics
        assert 'megatron_coord_replica_up{data_parallel_rank="1"} 0.0' in metrics
    finally:
        coordinator.alive = [True, True]


def test_timeout_aborts_the_request() -> None:
    """A request the coordinator never answers ends at the timeout, and is aborted."""
    coordinator = ScriptedCoordinator()
    server = HTTPServerThread(coordinator.address, model_name="m", request_timeout_s=0.5).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                result = client.completions.create(
                    model="m", prompt="silence", max_tokens=2, stream=stream
                )
                list(result) if stream else None
            assert info.value.status_code == 504
        deadline = time.monotonic() + 30  # the ABORTs travel asynchronously; wait for them
        while len(coordinator.aborted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(coordinator.aborted) == 2
    finally:
        server.stop()
        coordinator.close()


def test_api_key_and_body_limit() -> None:
    coordinator = ScriptedCoordinator()
    server = HTTPServerThread(
        coordinator.address, model_name="m", api_key="sekret", max_body_bytes=1000
    ).start()
    try:
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.completions.create(model="m", prompt="eod_reply", max_tokens=2)
        assert info.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0)
        assert right.completions.create(model="m", prompt="eod_reply", max_tokens=2).choices
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{server.url}/metrics").status_code == 200

        with pytest.raises(openai.APIStatusError) as info:
            right.completions.create(model="m", prompt="x" * 2000, max_tokens=2)
        assert info.value.status_code == 413

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield from [b" " * 300] * 5

        r = httpx.post(
            f"{server.url}/v1/completions",
            content=chunked(),
            headers={"authorization": "Bearer sekret", "content-type": "application/json"},
        )
        assert r.status_code == 413
        assert "1000 bytes" in r.json()["error"]["message"]
    finally:
        server.stop()
        coordinator.close()


def test_hugging_face_tokenizer_is_adapted() -> None:
    """A plain Hugging Face tokenizer works: its EOS text is cut, its chat template used."""
    from megatron_coord.tokenizer import gpt2_tokenizer

    hf = gpt2_tokenizer().hf_tokenizer
    hf.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    coordinator = ScriptedCoordinator()
    server = HTTPServerThread(coordinator.address, tokenizer=hf, model_name="m").start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="m", prompt="gpt2_eos", max_tokens=5)
        assert r.choices[0].text == "fine"
        # The template renders to the bare content, so the scripted reply is chosen by it.
        chat = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "gpt2_eos"}], max_tokens=5
        )
        assert chat.choices[0].message.content == "fine"
    finally:
        server.stop()
        coordinator.close()


def test_sampled_token_logprobs(scripted) -> None:
    _, _, client = scripted
    r = client.completions.create(model="m", prompt="logprobs", max_tokens=5, logprobs=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "hi!"  # the end-of-text token is cut from text and logprobs
    assert lp.tokens == ["h", "i", "!"]
    assert lp.token_logprobs == [-0.5, -1.0, -2.0]
    assert lp.text_offset == [0, 1, 2]
    assert lp.top_logprobs == [{"h": -0.5}, {"i": -1.0}, {"!": -2.0}]

    cut = client.completions.create(
        model="m", prompt="logprobs", max_tokens=5, logprobs=0, stop="!"
    )
    assert cut.choices[0].text == "hi"
    assert cut.choices[0].logprobs.tokens == ["h", "i"]

    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "logprobs"}], max_tokens=5, logprobs=True
    )
    content = chat.choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [
        ("h", -0.5, [104]),
        ("i", -1.0, [105]),
        ("!", -2.0, [33]),
    ]
    plain = client.completions.create(model="m", prompt="logprobs", max_tokens=5)
    assert plain.choices[0].logprobs is None  # not asked for


def test_logprobs_alternatives_and_streamed_logprobs(scripted) -> None:
    """logprobs >= 1 from an engine that sends no top-N lists: each position shows the chosen
    token alone. Streamed with logprobs, a choice comes whole in one chunk, logprobs with it."""
    _, _, client = scripted
    r = client.completions.create(model="m", prompt="logprobs", max_tokens=5, logprobs=1)
    assert r.choices[0].logprobs.top_logprobs == [{"h": -0.5}, {"i": -1.0}, {"!": -2.0}]
    chunks = list(
        client.completions.create(
            model="m", prompt="logprobs", max_tokens=5, logprobs=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == "hi!"
    carried = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [lp.tokens for lp in carried] == [["h", "i", "!"]]
    assert carried[0].token_logprobs == [-0.5, -1.0, -2.0]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_startup_fails_clearly_without_a_coordinator() -> None:
    """Nobody answers CONNECT: start() raises instead of serving a server that cannot work."""
    with zmq.Context() as context, context.socket(zmq.ROUTER) as silent:
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        server = HTTPServerThread(f"tcp://127.0.0.1:{port}", connect_timeout_s=0.3)
        with pytest.raises(RuntimeError, match="is the coordinator at tcp://127.0.0.1"):
            server.start()
        assert not server.thread.is_alive()
