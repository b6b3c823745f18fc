"""InferenceClient against a real coordinator and fake engine processes."""

from __future__ import annotations

import asyncio
import socket

import pytest

from megatron_coord import InferenceClient, SamplingParams
from megatron_coord.client import RequestError


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


async def started(address: str) -> InferenceClient:
    client = InferenceClient(address)
    await client.start()
    return client


def test_connect_timeout_raises_a_clear_error():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there

    async def connect():
        client = InferenceClient(f"tcp://127.0.0.1:{port}", connect_timeout=0.3)
        await client.start()

    with pytest.raises(TimeoutError, match="no CONNECT_ACK from the coordinator"):
        run(connect())


def test_add_request_before_start_is_refused():
    async def submit():
        InferenceClient("tcp://127.0.0.1:1").add_request("hi", SamplingParams())

    with pytest.raises(RuntimeError, match="not running"):
        run(submit())


def test_requests_resolve_to_records_with_latency(deploy):
    d = deploy(2)

    async def go():
        client = await started(d.address)
        records = await asyncio.gather(
            client.add_request("hello", SamplingParams(num_tokens_to_generate=3)),
            client.add_request([119, 111, 114, 108, 100], {"num_tokens_to_generate": 2}),
            client.add_request("default params"),
        )
        client.stop()
        return records

    first, second, third = run(go())
    assert first["requests"][0]["generated_text"] == "hel"
    assert second["requests"][0]["prompt"] == "world"
    assert second["requests"][0]["generated_text"] == "wo"
    assert len(third["requests"][0]["generated_tokens"]) == 30  # Megatron's default
    assert first["latency"] > 0


def test_invalid_request_fails_its_future_only(deploy):
    d = deploy(1)

    async def go():
        client = await started(d.address)
        bad = client.add_request("", SamplingParams())
        worse = client.add_request("x", {"temperature": -1.0})
        good = client.add_request("ok", SamplingParams(num_tokens_to_generate=2))
        results = await asyncio.gather(bad, worse, good, return_exceptions=True)
        client.stop()
        return results

    bad, worse, good = run(go())
    assert isinstance(bad, RequestError) and bad.code == "invalid_request"
    assert "empty" in bad.message
    assert isinstance(worse, RequestError) and "temperature" in worse.message
    assert good["requests"][0]["generated_text"] == "ok"


def test_streaming_never_splits_a_character(deploy):
    d = deploy(1)
    prompt = "aé€!"  # 1 + 2 + 3 + 1 bytes: one token per byte with ByteTokenizer

    async def go():
        client = await started(d.address)
        items = [
            item
            async for item in client.add_request_streaming(
                prompt, SamplingParams(num_tokens_to_generate=7)
            )
        ]
        client.stop()
        return items

    items = run(go())
    partials, final = items[:-1], items[-1]
    assert [p["tokens"] for p in partials] == [[b] for b in prompt.encode()]
    assert [p["text"] for p in partials] == ["a", "", "é", "", "", "€", "!"]
    assert "".join(p["text"] for p in partials) == final["requests"][0]["generated_text"] == prompt


def test_abort_ends_the_request_with_an_aborted_record(deploy):
    d = deploy(2)

    async def go():
        client = await started(d.address)
        await client.pause_engines()  # fake engines hold requests while paused
        future = client.add_request("abort me", SamplingParams(num_tokens_to_generate=2))
        client.abort_request(future)
        record = await future
        client.abort_request(future.request_id)  # no longer in flight: an error, logged
        client.unpause_engines()
        after = await client.add_request("after", SamplingParams(num_tokens_to_generate=2))
        client.stop()
        return record, after, client.last_error

    record, after, last_error = run(go())
    assert record["requests"][0]["status"] == "ABORTED"
    assert after["requests"][0]["generated_text"] == "af"
    assert last_error is not None and last_error.code == "invalid_request"


def test_stop_cancels_pending_futures(deploy):
    d = deploy(1)

    async def go():
        client = await started(d.address)
        await client.pause_engines()
        future = client.add_request("never", SamplingParams())
        await asyncio.sleep(0)
        client.stop()
        return future

    future = run(go())
    assert future.cancelled()


def test_stop_ends_open_streams(deploy):
    d = deploy(1)

    async def go():
        client = await started(d.address)
        await client.pause_engines()
        stream = client.add_request_streaming("never", SamplingParams())
        reader = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)
        assert not reader.done()  # paused engines: nothing can arrive
        client.stop()
        with pytest.raises(ConnectionError, match="stopped"):
            await reader

    run(go())


def test_connect_ack_confirms_a_ping_cadence_its_timeout_can_keep(deploy):
    """The client judges the coordinator: CONNECT says how (its ping interval and
    coordinator_timeout), CONNECT_ACK gives the cadence to keep (liveness_contract.py)."""
    d = deploy(1)

    async def go():
        client = InferenceClient(d.address, heartbeat_interval=2.5, coordinator_timeout=3.0)
        default = InferenceClient(d.address)
        await client.start()
        await default.start()
        try:
            record = await client.add_request("hi", {"num_tokens_to_generate": 1})
            return client.ping_interval, default.ping_interval, record
        finally:
            client.stop()
            default.stop()

    interval, default_interval, record = run(go())
    assert interval == 1.0  # a third of its 3 s timeout, not its own 2.5 s
    assert default_interval == 1.0  # the defaults keep the contract as they are
    assert record["requests"][0]["generated_text"] == "h"
