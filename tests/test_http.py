"""The OpenAI-compatible HTTP front end, driven by the official ``openai`` package.

A real coordinator process and two real fake-engine processes serve; the HTTP server runs on a
thread of the test process (uvicorn on a free 127.0.0.1 port). The fake engine echoes the prompt
(``generated[i] = prompt[i % len(prompt)]``) and the byte tokenizer maps text to UTF-8 bytes, so
every expected text and token count below is computed, not recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from _procs import free_port
from conftest import start_coordinator
from prometheus_client.parser import text_string_to_metric_families

from megatron_coord.client import InferenceClient
from megatron_coord.serving import HTTPServerThread
from megatron_coord.serving.chat_template import render_default_template
from megatron_coord.testing.fake_engine import spawn

MODEL = "tiny-echo"


def echo(prompt: str, n: int) -> str:
    """What the fake engine generates for an ASCII prompt with max_tokens=n."""
    return "".join(prompt[i % len(prompt)] for i in range(n))


class Stack:
    """Coordinator + fake engines + HTTP server, torn down in reverse order."""

    def __init__(self, replicas: int = 2, **options: Any) -> None:
        self.address, self.process, ready = start_coordinator(replicas)
        self.engines = [spawn(self.address, rank) for rank in range(replicas)]
        assert ready.wait(60), "engines did not register"
        self.server = HTTPServerThread(self.address, model_name=MODEL, **options).start()
        self.url = self.server.url
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def close(self) -> None:
        self.server.stop()
        for engine in self.engines:
            engine.kill()
            engine.wait()
        self.process.kill()
        self.process.join()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics and parse it with prometheus_client's parser."""
        text = httpx.get(f"{self.url}/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def control(self, action: str) -> None:
        """Pause or unpause every engine through a separate InferenceClient."""

        async def run() -> None:
            client = InferenceClient(self.address)
            await client.start()
            if action == "pause":
                await asyncio.wait_for(client.pause_engines(), 30)
            else:
                client.unpause_engines()
                # A round trip through every engine proves UNPAUSE arrived (messages stay in
                # order) before this client's socket closes.
                await asyncio.gather(
                    *(client.add_request("u", {"num_tokens_to_generate": 1}) for _ in self.engines)
                )
            client.stop()

        asyncio.run(run())


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    yield s
    s.close()


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# --------------------------------------------------------------------------- completions


def test_completion_text_prompt(stack: Stack) -> None:
    r = stack.openai.completions.create(model=MODEL, prompt="hello", max_tokens=7)
    assert r.object == "text_completion"
    assert r.model == MODEL
    assert r.id.startswith("cmpl-")
    assert [c.text for c in r.choices] == [echo("hello", 7)]
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 7, 12)


def test_completion_token_ids_with_n_choices(stack: Stack) -> None:
    r = stack.openai.completions.create(
        model=MODEL, prompt=[104, 105, 33], max_tokens=5, n=3, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [echo("hi!", 5)] * 3
    # The prompt is counted once, the completions of every choice are summed (as OpenAI does).
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 15)


def test_completion_batch_of_prompts(stack: Stack) -> None:
    r = stack.openai.completions.create(model=MODEL, prompt=["ab", "xyz", "q"], max_tokens=4)
    assert [(c.index, c.text) for c in r.choices] == [
        (0, echo("ab", 4)),
        (1, echo("xyz", 4)),
        (2, echo("q", 4)),
    ]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (6, 12)


def test_completion_default_max_tokens(stack: Stack) -> None:
    """No max_tokens, or null: OpenAI's default of 16."""
    r = stack.openai.completions.create(model=MODEL, prompt="defaults")
    assert r.choices[0].text == echo("defaults", 16)
    r = httpx.post(
        f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "nul", "max_tokens": None}
    )
    assert r.json()["choices"][0]["text"] == echo("nul", 16)


def test_completion_zero_tokens(stack: Stack) -> None:
    r = stack.openai.completions.create(model=MODEL, prompt="abc", max_tokens=0)
    assert r.choices[0].text == ""
    assert r.usage.completion_tokens == 0


def test_completion_stop_string(stack: Stack) -> None:
    r = stack.openai.completions.create(
        model=MODEL, prompt="hello world", max_tokens=20, stop=["wo", "zz"]
    )
    assert r.choices[0].text == "hello "
    assert r.choices[0].finish_reason == "stop"


def test_streaming_completion_matches_unary(stack: Stack) -> None:
    unary = stack.openai.completions.create(model=MODEL, prompt="stream me", max_tokens=13)
    chunks = list(
        stack.openai.completions.create(
            model=MODEL,
            prompt="stream me",
            max_tokens=13,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == unary.choices[0].text == echo("stream me", 13)
    assert len([t for t in texts if t]) > 1  # it really streamed, piece by piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 13
    assert chunks[-1].usage.prompt_tokens == 9
    assert len({c.id for c in chunks}) == 1


def test_streaming_several_choices(stack: Stack) -> None:
    chunks = list(
        stack.openai.completions.create(
            model=MODEL,
            prompt=["ab", "xyz"],
            n=2,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert texts == {0: echo("ab", 5), 1: echo("ab", 5), 2: echo("xyz", 5), 3: echo("xyz", 5)}
    for reasons in finishes.values():  # exactly one finish per choice, and it comes last
        assert reasons[-1] == "length" and reasons.count("length") == 1
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 20)


def test_streaming_stop_string_across_chunks(stack: Stack) -> None:
    # Tokens are single bytes, so "wor" arrives in three chunks and must still be caught, and
    # the held-back "w" of a near-miss must still be sent.
    chunks = stack.openai.completions.create(
        model=MODEL, prompt="aw world", max_tokens=30, stop="wor", stream=True
    )
    pieces, finish = [], None
    for chunk in chunks:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == "aw "
    assert finish == "stop"


# --------------------------------------------------------------------------- chat


def test_chat_uses_default_template(stack: Stack) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    prompt = render_default_template(messages)
    r = stack.openai.chat.completions.create(model=MODEL, messages=messages, max_tokens=40)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    # The echo engine repeats the prompt it was given: exactly the rendered template.
    assert r.choices[0].message.content == echo(prompt, 40)
    assert r.usage.prompt_tokens == len(prompt.encode())
    assert r.choices[0].finish_reason == "length"


def test_chat_streaming(stack: Stack) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]
    prompt = render_default_template([{"role": "user", "content": "parts"}])
    chunks = list(
        stack.openai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=9, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == echo(prompt, 9)
    assert chunks[-1].choices[0].finish_reason == "length"


# --------------------------------------------------------------------------- other endpoints


def test_models_and_health(stack: Stack) -> None:
    assert [m.id for m in stack.openai.models.list()] == [MODEL]
    assert stack.openai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        stack.openai.models.retrieve("other")
    health = httpx.get(f"{stack.url}/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "replicas": 2, "replicas_alive": 2}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ],
)
def test_bad_completion_requests_get_400(stack: Stack, kwargs: dict, param: str) -> None:
    request = {"model": MODEL, "prompt": "x", "max_tokens": 3, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        stack.openai.completions.create(**request)
    error = info.value.body
    assert info.value.status_code == 400
    assert error["type"] == "invalid_request_error"
    assert param in (error["param"] or "") + error["message"]


def test_unknown_model_is_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        stack.openai.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert info.value.body["code"] == "model_not_found"


def test_malformed_json_gets_openai_error(stack: Stack) -> None:
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"


def test_server_survives_bad_requests(stack: Stack) -> None:
    """After a burst of garbage, valid requests are still answered."""
    for body in (b"", b"[]", b'{"model": 1}', b"\xff\xfe", b'{"prompt": {"a": 1}}'):
        r = httpx.post(
            f"{stack.url}/v1/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400, body
    r = stack.openai.completions.create(model=MODEL, prompt="ok", max_tokens=2)
    assert r.choices[0].text == "ok"


# --------------------------------------------------------------------------- metrics


def test_metrics_count_what_the_requests_did(stack: Stack) -> None:
    before = stack.metrics()
    usage = []
    for prompt in ("one", "three"):
        usage.append(
            stack.openai.completions.create(model=MODEL, prompt=prompt, max_tokens=4).usage
        )
    chat = stack.openai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "m"}], max_tokens=6
    )
    streamed = list(
        stack.openai.completions.create(
            model=MODEL,
            prompt="str",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage.append(streamed[-1].usage)
    with pytest.raises(openai.BadRequestError):
        stack.openai.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=-1)
    after = stack.metrics()

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    c = {"endpoint": "completions"}
    assert delta("megatron_coord_requests_total", outcome="success", **c) == 3
    assert delta("megatron_coord_requests_total", outcome="invalid_request", **c) == 1
    assert (
        delta("megatron_coord_requests_total", endpoint="chat_completions", outcome="success") == 1
    )
    assert delta("megatron_coord_prompt_tokens_total", **c) == sum(u.prompt_tokens for u in usage)
    assert delta("megatron_coord_generation_tokens_total", **c) == sum(
        u.completion_tokens for u in usage
    )
    assert (
        delta("megatron_coord_generation_tokens_total", endpoint="chat_completions")
        == chat.usage.completion_tokens
    )
    assert delta("megatron_coord_request_latency_seconds_count", **c) == 3
    assert delta("megatron_coord_time_to_first_token_seconds_count", **c) == 1
    assert sample(after, "megatron_coord_request_latency_seconds_bucket", le="+Inf", **c) == sample(
        after, "megatron_coord_request_latency_seconds_count", **c
    )
    # The coordinator's view, fetched at scrape time.
    assert sample(after, "megatron_coord_coordinator_up") == 1
    assert sample(after, "megatron_coord_replicas_alive") == 2
    for rank in ("0", "1"):
        assert sample(after, "megatron_coord_replica_up", data_parallel_rank=rank) == 1
        assert sample(after, "megatron_coord_replica_queue_depth", data_parallel_rank=rank) == 0
    assert sample(after, "megatron_coord_http_requests_running") == 0


# --------------------------------------------------------------------------- load and aborts


def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` (state, not speed: the timeout only bounds a failing test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_overload_429_queue_depth_and_disconnect_abort() -> None:
    """With engines paused, one request holds the only slot: the next gets 429, the replica
    queue depth shows the held request, and a client that hangs up gets its request aborted."""
    s = Stack(replicas=1, max_concurrent_requests=1)
    try:
        s.control("pause")
        held: dict[str, Any] = {}

        def first() -> None:
            held["r"] = s.openai.completions.create(model=MODEL, prompt="held", max_tokens=3)

        thread = threading.Thread(target=first)
        thread.start()
        wait_until(lambda: sample(s.metrics(), "megatron_coord_http_requests_running") == 1, "run")
        with pytest.raises(openai.RateLimitError) as info:
            s.openai.completions.create(model=MODEL, prompt="second", max_tokens=3)
        assert info.value.status_code == 429
        assert info.value.body["type"] == "rate_limit_error"
        m = s.metrics()
        assert sample(m, "megatron_coord_replica_queue_depth", data_parallel_rank="0") == 1
        assert sample(m, "megatron_coord_coordinator_requests_in_flight") == 1
        assert (
            sample(m, "megatron_coord_requests_total", endpoint="completions", outcome="overloaded")
            == 1
        )
        s.control("unpause")
        thread.join(30)
        assert held["r"].choices[0].text == echo("held", 3)

        # Clients that disconnect before their answer (streaming, then unary): each request is
        # aborted on the engine (the paused fake engine drops it) and counted as aborted.
        s.control("pause")
        for expected_aborts, stream in ((1, True), (2, False)):
            with socket.create_connection(("127.0.0.1", s.server.port)) as raw:
                body = json.dumps(
                    {"model": MODEL, "prompt": "bye", "max_tokens": 3, "stream": stream}
                ).encode()
                raw.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                wait_until(
                    lambda: (
                        sample(s.metrics(), "megatron_coord_coordinator_requests_in_flight") == 1
                    ),
                    "the request to reach the coordinator",
                )
            wait_until(
                lambda n=expected_aborts: (
                    sample(
                        s.metrics(),
                        "megatron_coord_requests_total",
                        endpoint="completions",
                        outcome="aborted",
                    )
                    == n
                ),
                "the disconnect to be counted",
            )
            wait_until(
                lambda: sample(s.metrics(), "megatron_coord_coordinator_requests_in_flight") == 0,
                "the engine to drop the aborted request",
            )
        assert sample(s.metrics(), "megatron_coord_http_requests_running") == 0
        s.control("unpause")
        r = s.openai.completions.create(model=MODEL, prompt="after", max_tokens=2)
        assert r.choices[0].text == "af"
    finally:
        s.close()


def test_health_and_metrics_when_the_coordinator_is_gone() -> None:
    s = Stack(replicas=2, request_timeout_s=1.0, stats_timeout_s=0.3)
    try:
        s.process.kill()
        s.process.join()
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable"
        m = s.metrics()
        assert sample(m, "megatron_coord_coordinator_up") == 0
        assert sample(m, "megatron_coord_replicas_alive") == 0
        # An inference request nobody can answer ends at the server's timeout with a 504.
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert info.value.status_code == 504
        m = s.metrics()
        assert (
            sample(m, "megatron_coord_requests_total", endpoint="completions", outcome="timeout")
            == 1
        )
    finally:
        s.close()


# --------------------------------------------------------------------------- command line


def test_command_line_server(stack: Stack) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "megatron_coord.serving",
        "--coordinator-address",
        stack.address,
        "--port",
        str(port),
        "--model-name",
        "cli-model",
    ]
    process = subprocess.Popen(command)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert process.poll() is None, "the server exited"
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, "the command-line server to come up", timeout=60)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="cli-model", prompt="cli", max_tokens=4)
        assert r.choices[0].text == echo("cli", 4)
    finally:
        process.terminate()
        process.wait(30)


def test_help_explains_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "megatron_coord.serving", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--coordinator-address",
        "--host",
        "--port",
        "--tokenizer",
        "--model-name",
        "--max-concurrent-requests",
        "--request-timeout",
        "--default-chat-max-tokens",
        "--max-tokens-limit",
        "--api-key",
        "--max-body-bytes",
        "--log-level",
    ):
        assert option in out


def test_server_process(stack: Stack) -> None:
    """HTTPServerProcess (what launch/serve.py uses): serves, stops, and reports bad setups."""
    from megatron_coord.serving import HTTPServerProcess

    with pytest.raises(RuntimeError, match="failed to start"):
        HTTPServerProcess(stack.address, tokenizer=str(os.devnull) + "/nothing").start()
    server = HTTPServerProcess(stack.address, model_name="proc-model").start()
    try:
        assert server.port != 0
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200, "health")
        r = client.completions.create(model="proc-model", prompt="proc", max_tokens=6)
        assert r.choices[0].text == echo("proc", 6)
        process = server.process
    finally:
        server.stop()
    assert process.exitcode is not None  # stopped, not left running
