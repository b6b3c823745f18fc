"""Megatron-core 0.19.2 interop: its own InferenceClient, and engines of its protocol built from
its own record classes, against our coordinator. 0.19 runs in separate processes (it shares the
package name ``megatron`` with the 0.16.1 in the venv); scripts/setup.sh unpacks it, and a
missing install fails here, never skips."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Peer, elastic_coordinator, start_coordinator, stop, wait_stats
from test_engine import hf_greedy

from megatron_coord.client import InferenceClient as OurClient
from megatron_coord.coordinator.dialects import FIELDS_016, FIELDS_019
from megatron_coord.testing import megatron019
from megatron_coord.testing.fault_harness import StandaloneCoordinator

CLIENT = str(Path(__file__).with_name("_megatron019_client.py"))
ENV = megatron019.environment()  # raises if setup did not unpack 0.19.2


def run_client(*args: str, timeout: float = 120) -> dict:
    """Run tests/_megatron019_client.py under 0.19; its JSON result."""
    done = subprocess.run(
        [sys.executable, CLIENT, *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def spawn_019(address: str, rank: int, ranks: int = 1) -> subprocess.Popen:
    """Fake 0.19 engines of ranks ``rank..rank+ranks-1`` in one process (0.19's import costs
    seconds per process)."""
    command = [sys.executable, "-m", "megatron_coord.testing.fake_engine_019", address]
    return subprocess.Popen([*command, "--rank", str(rank), "--ranks", str(ranks)], env=ENV)


def expected_echo(prompt: str | list[int], count: int) -> list[int]:
    """What the fake engines generate: the prompt's tokens, repeated."""
    tokens = list(prompt.encode()) if isinstance(prompt, str) else prompt
    return [tokens[i % len(tokens)] for i in range(count)]


def prompts(count: int) -> list[str | list[int]]:
    """The prompts _megatron019_client.py sends."""
    return [f"prompt {i}" if i % 4 < 2 else [72, 105, 33 + i] for i in range(count)]


def check_echo_replies(result: dict, count: int = 20, tokens: int = 4) -> None:
    replies = result["replies"]
    assert len(replies) == count
    assert result["listeners_alive"]
    for i, (prompt, reply) in enumerate(zip(prompts(count), replies, strict=True)):
        assert reply["class"] == ("DynamicInferenceRequest" if i % 2 else "dict")
        generated = expected_echo(prompt, tokens)
        assert reply["generated_tokens"] == generated
        assert reply["generated_text"] == bytes(generated).decode()
        assert reply["status"] == "COMPLETED"


@pytest.fixture
def coordinator_019_separate():
    """The same, each engine a process of its own (so that one can be killed)."""
    yield from _coordinator_019(separate=True)


@pytest.fixture
def coordinator_019():
    """A coordinator spawned as a launch's rank 0 does, for 2 engines of 0.19's protocol."""
    yield from _coordinator_019(separate=False)


def _coordinator_019(separate: bool):
    """The coordinator and its two 0.19 engines: one process each with ``separate``, else both
    in one process (the engines are threads: same sockets, one import)."""
    address, process, ready = start_coordinator(2, megatron_engines="0.19")
    if separate:
        engines = [spawn_019(address, rank) for rank in range(2)]
    else:
        engines = [spawn_019(address, 0, ranks=2)]
    assert ready.wait(60), "engines did not register"
    yield address, process, engines
    for engine in engines:
        if engine.poll() is None:
            engine.kill()
        engine.wait()
    if process.is_alive():
        process.kill()
    process.join()


def test_the_016_record_fields_are_megatrons():
    """dialects.py's 0.16 field list is exactly the dataclass's of 0.16.1 (0.19.2's: below)."""
    from dataclasses import fields

    from megatron.core.inference.inference_request import DynamicInferenceRequest

    assert {f.name for f in fields(DynamicInferenceRequest)} == FIELDS_016


def test_megatron_019_client_and_engines(coordinator_019):
    """20 requests from 0.19's client on 0.19's engines; then PAUSE, UNPAUSE, PAUSE, STOP: the
    engines (which assert 0.19's state machine) stop cleanly and so does the coordinator."""
    address, process, engines = coordinator_019
    check_echo_replies(run_client("requests", address, "--stop"))
    assert [e.wait(30) for e in engines] == [0]
    process.join(30)
    assert process.exitcode == 0


def test_megatron_019_client_on_our_engines(deploy):
    """A 0.19 client served by engines of ours: its replies come in its own protocol."""
    d = deploy(2)
    result = run_client("requests", d.address, "--stop")
    check_echo_replies(result)
    assert set(result["fields"]) - {"event_add_engine"} == FIELDS_019  # 0.19.2's dataclass
    d.wait_stopped()
    assert d.process.exitcode == 0
    assert [e.returncode for e in d.engines] == [0, 0]


def test_megatron_016_client_on_019_engines(coordinator_019):
    """A 0.16 client (the venv's) served by 0.19 engines gets 0.16's records, which it
    deserializes; its PAUSE / STOP (awaiting acks 0.19 engines never send) complete."""
    from megatron.core.inference.inference_client import InferenceClient
    from megatron.core.inference.sampling_params import SamplingParams

    address, process, engines = coordinator_019

    async def go():
        client = InferenceClient(address)
        await client.start()
        params = SamplingParams(num_tokens_to_generate=3)
        records = await asyncio.gather(
            *(client.add_request(f"hello {i}", params) for i in range(6))
        )
        await asyncio.wait_for(client.pause_engines(), 10)
        await asyncio.wait_for(client.stop_engines(), 10)
        client.stop()
        return records

    records = asyncio.run(asyncio.wait_for(go(), 60))
    for i, record in enumerate(records):
        request = record.requests[0]
        assert request.generated_tokens == expected_echo(f"hello {i}", 3)
        assert request.generated_text == "hel"
        assert request.status.name == "COMPLETED"
    assert [e.wait(30) for e in engines] == [0]
    process.join(30)
    assert process.exitcode == 0


def test_signals_019_engines_cannot_take_are_not_sent(coordinator_019_separate):
    """SUSPEND from our client while running reaches no 0.19 engine (it would assert); an
    engine's DISCONNECT takes it out of routing and the other serves every request."""
    address, process, engines = coordinator_019_separate

    async def go():
        client = OurClient(address)
        await client.start()
        client.suspend_engines()  # invalid in 0.19's machine: not relayed to its engines
        client.resume_engines()
        before = await client.stats()
        engines[0].terminate()  # the fake engine sends DISCONNECT on SIGTERM
        assert engines[0].wait(10) == 0
        for _ in range(100):
            after = await client.stats()
            if len(after["engines"]) == 1:
                break
            await asyncio.sleep(0.05)
        records = await asyncio.gather(
            *(client.add_request(f"p{i}", {"num_tokens_to_generate": 2}) for i in range(10))
        )
        client.stop()
        return before, after, records

    before, after, records = asyncio.run(asyncio.wait_for(go(), 60))
    assert len(before["engines"]) == 2 and len(after["engines"]) == 1
    assert after["engines_lost"] == 1
    assert [r["requests"][0]["generated_text"] for r in records] == [f"p{i}" for i in range(10)]
    assert engines[1].poll() is None  # alive: it never got a signal it asserts against


def test_bad_input_from_a_019_client_is_never_answered_in_our_headers(coordinator_019):
    """Malformed frames, unknown headers, bad params and a duplicate id from a 0.19 peer get
    either nothing or a FAILED record, never an ERROR (100) it could not decode; a FAILED
    record carries the reason as 0.19's engines do, and deserializes in 0.19's classes."""
    address, process, engines = coordinator_019
    result = run_client("bad", address)
    assert set(result["headers"]) <= {1, 21}, result["headers"]
    replies = result["replies"]
    assert sorted(replies) == ["7", "8", "9"]
    assert replies["7"]["status"] == replies["8"]["status"] == "FAILED"
    assert replies["7"]["events"] == ["ERROR_NONTRANSIENT", "FAIL"]
    assert replies["9"]["status"] == "COMPLETED"
    assert result["headers"].count(21) == 3  # the duplicate id got no reply
    typed = result["typed_failed"]
    assert typed["failed"]["status"] == "FAILED"
    assert typed["message"].startswith("invalid_request: ")
    assert typed["ok"]["generated_text"] == "fi"
    assert [e.poll() for e in engines] == [None]


def _close_link(server) -> None:
    """Close an in-process engine's socket without lingering: its coordinator is gone, and a
    context left to the garbage collector with unsent messages blocks it in ``term()``
    (forever: it hung a later test that allocated enough to trigger a collection)."""
    link = server.link
    if link is not None and link.socket is not None:
        link.socket.close(linger=0)
        link.socket = None
        link.context.term()


def test_megatron_019_client_on_our_real_engine(checkpoint, tokenizer, model):
    """Our real engine (the tiny checkpoint, TP=1) serving 0.19's client: greedy tokens as
    transformers generates them."""
    from megatron_coord.engine import InferenceEngine
    from megatron_coord.engine.server import EngineServer
    from megatron_coord.parallel_state import single_process_state

    address, process, ready = start_coordinator(1, tokenizer=tokenizer)
    engine = InferenceEngine(model, max_batch_size=8, max_seq_len=64)
    server = EngineServer(engine, single_process_state(), address, idle_timeout_s=0.05)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        result = run_client("requests", address, "--tokens", "4", "--stop")
        thread.join(30)
        assert not thread.is_alive()
    finally:
        server.request_shutdown()
        thread.join(30)
        process.join(30)
        if process.is_alive():
            process.kill()
        _close_link(server)
    token_prompts = [p if isinstance(p, list) else tokenizer.tokenize(p) for p in prompts(20)]
    expected = hf_greedy(checkpoint, token_prompts, 4)
    assert [r["generated_tokens"] for r in result["replies"]] == expected
    assert all(r["status"] == "COMPLETED" for r in result["replies"])
    assert result["replies"][0]["generated_text"] == tokenizer.detokenize(expected[0])
    assert process.exitcode == 0


def test_megatron_019_set_generation_epoch_on_our_real_engine(tokenizer, model):
    """0.19's client's SET_GENERATION_EPOCH reaches our engine (as SET_GENERATION_EPOCH_OURS):
    its records carry ``policy_epoch`` / ``kv_cache_epoch`` as 0.19's engine stamps them
    (``[[0, epoch]]`` for a request admitted after it; a boundary at the last token's index
    for one it straddles), and the coordinator publishes ``str(epoch)``."""
    from megatron_coord.engine import InferenceEngine
    from megatron_coord.engine.server import EngineServer
    from megatron_coord.parallel_state import single_process_state

    address, process, ready = start_coordinator(1, tokenizer=tokenizer)
    engine = InferenceEngine(model, max_batch_size=8, max_seq_len=64)
    server = EngineServer(engine, single_process_state(), address, idle_timeout_s=0.05)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        result = run_client("epoch", address, "--tokens", "4")
        thread.join(30)
        assert not thread.is_alive()
    finally:
        server.request_shutdown()
        thread.join(30)
        process.join(30)
        if process.is_alive():
            process.kill()
        _close_link(server)
    before, after, straddling, last = result["replies"]
    assert all(r["class"] == "DynamicInferenceRequest" for r in result["replies"])
    assert before["policy_epoch"] is None and before["kv_cache_epoch"] is None
    assert after["policy_epoch"] == after["kv_cache_epoch"] == [[0, 9]]
    assert last["policy_epoch"] == last["kv_cache_epoch"] == [[0, 10]]
    epochs = straddling["policy_epoch"]
    assert straddling["generated_length"] == 40
    assert epochs in ([[0, 9]], [[0, 10]]) or (
        len(epochs) == 2 and epochs[0] == [0, 9] and epochs[1][1] == 10
        and 3 <= epochs[1][0] < 3 + 40 - 1
    ), epochs  # fmt: skip
    assert straddling["kv_cache_epoch"] == epochs  # under keep: the same boundaries
    assert engine.weight_version == "10"


def test_standalone_coordinator_with_019_engines_and_shutdown(checkpoint, tokenizer):
    """``python -m megatron_coord.coordinator --megatron-engines 0.19``: a 0.19 engine joins,
    0.19's client is served (its tokenizer on the coordinator) and its SHUTDOWN ends the
    coordinator gracefully, leaving the engine running."""
    coordinator = StandaloneCoordinator(checkpoint, "--megatron-engines", "0.19")
    engine = spawn_019(coordinator.address, 0)
    try:
        result = run_client("requests", coordinator.address, "--count", "8", "--shutdown")
        assert coordinator.wait(30) == 0
        assert engine.poll() is None
    finally:
        coordinator.kill()
        engine.kill()
        engine.wait()
    for prompt, reply in zip(prompts(8), result["replies"], strict=True):
        tokens = prompt if isinstance(prompt, list) else tokenizer.tokenize(prompt)
        assert reply["generated_tokens"] == expected_echo(tokens, 4)
        assert reply["generated_text"] == tokenizer.detokenize(expected_echo(tokens, 4))


def test_a_019_engine_gets_only_019_messages_and_bad_replies_are_not_answered():
    """Frame by frame: a 0.19 engine is sent SUBMIT as ``[20, ...]``, its ``[21, [merged]]``
    reaches a client of ours as a record, and bad frames from it (garbage, 0.16's reply header,
    a reply for a request it does not hold) are dropped without a word back to it."""
    import zmq

    coord, client = elastic_coordinator(megatron_engines="0.19")
    engine = Peer(coord.address, identity=b"mp-coord-0", timeout_ms=500)
    engine.send_raw(b"")
    wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
    client.send(3, "a", "Hi", {"num_tokens_to_generate": 2})
    header, request_id, prompt, params = engine.recv()
    assert (header, prompt, params) == (20, [72, 105], {"num_tokens_to_generate": 2})
    engine.send_raw(b"\xc1 garbage")
    engine.send(4, [{"requests": [{"request_id": request_id}]}])  # 0.16's header
    engine.send(21, [{"request_id": 12345, "generated_tokens": [1]}])  # not its request
    merged = {"request_id": request_id, "prompt_tokens": None, "generated_tokens": [72, 105]}
    engine.send(21, [{**merged, "status": "COMPLETED", "latency": 0.5}])
    reply = client.recv()
    assert reply[:2] == [4, "a"]
    assert reply[2]["requests"][0]["generated_text"] == "Hi"
    assert reply[2]["requests"][0]["prompt"] == "Hi"
    try:
        unexpected = engine.recv()
    except zmq.Again:
        unexpected = None
    assert unexpected is None, unexpected
    client.send(5)  # PAUSE: no ack awaited from a 0.19 engine, so the client is told at once
    assert engine.recv() == [40]
    assert client.recv() == [6]
    engine.send(60)  # DISCONNECT
    wait_stats(client, lambda s: not s["engines"], "engine left")
    stop(coord, client)
