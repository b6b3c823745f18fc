"""Abort end to end with a REAL engine (one slot): abort_request on a future and on a stream,
and closing a stream early, each free the slot for the next request and end with exactly one
final record marked aborted (or none, for the stream nobody reads any more)."""

from __future__ import annotations

import pytest
from test_streaming_engine import run, serving  # noqa: F401

from megatron_coord import InferenceClient

LONG = {"top_k": 1, "num_tokens_to_generate": 120}
SHORT = {"top_k": 1, "num_tokens_to_generate": 5}
PROMPT = [464, 2068, 7586]  # "The quick brown" in GPT-2 tokens

one_slot = pytest.mark.parametrize("serving", [1], indirect=True)


async def _started(address: str) -> InferenceClient:
    client = InferenceClient(address)
    await client.start()
    return client


async def _finish(client: InferenceClient) -> None:
    await client.stop_engines()
    client.stop()


@one_slot
def test_abort_a_stream_frees_the_slot_and_yields_one_final_record(serving):  # noqa: F811 (the imported fixture)
    async def go():
        client = await _started(serving.address)
        stream = client.add_request_streaming(PROMPT, {**LONG, "streaming_interval": 1})
        first = await stream.__anext__()
        # The only slot is busy: this request waits in the engine's queue.
        follow_up = client.add_request(PROMPT, SHORT)
        client.abort_request(first["request_id"])
        rest = [item async for item in stream]
        record = await follow_up
        await _finish(client)
        return first, rest, record

    first, rest, follow_up = run(go())
    finals = [item for item in rest if "requests" in item]
    assert len(finals) == 1 and rest[-1] is finals[0]  # exactly one final record, last
    (request,) = finals[0]["requests"]
    assert request["status"] == "ABORTED" and request["finish_reason"] == "abort"
    streamed = first["tokens"] + [t for item in rest[:-1] for t in item["tokens"]]
    assert (
        streamed == request["generated_tokens"] and len(streamed) < LONG["num_tokens_to_generate"]
    )
    assert follow_up["requests"][0]["status"] == "COMPLETED"
    assert len(follow_up["requests"][0]["generated_tokens"]) == SHORT["num_tokens_to_generate"]
    # The follow-up was admitted before the aborted request could have run to its budget.
    generated = len(streamed) + SHORT["num_tokens_to_generate"]
    assert serving.server.generated_tokens == generated
    assert not serving.server.engine.has_work and serving.server.engine.free_slots == [0]


@one_slot
def test_abort_a_future_resolves_it_with_one_aborted_record(serving):  # noqa: F811 (the imported fixture)
    async def go():
        client = await _started(serving.address)
        await client.pause_engines()  # deterministic: the abort lands before many steps ran
        future = client.add_request(PROMPT, LONG)
        follow_up = client.add_request(PROMPT, SHORT)
        client.abort_request(future)
        client.unpause_engines()
        record = await future
        done = await follow_up
        await _finish(client)
        return record, done, client.last_error

    record, follow_up, last_error = run(go())
    (request,) = record["requests"]
    assert request["status"] == "ABORTED" and request["generated_tokens"] == []
    assert len(follow_up["requests"][0]["generated_tokens"]) == SHORT["num_tokens_to_generate"]
    assert serving.server.generated_tokens == SHORT["num_tokens_to_generate"]
    assert last_error is None  # one record, no stray error for the aborted request


@one_slot
def test_closing_a_stream_early_aborts_it(serving):  # noqa: F811 (the imported fixture)
    async def go():
        client = await _started(serving.address)
        stream = client.add_request_streaming(PROMPT, {**LONG, "streaming_interval": 1})
        first = await stream.__anext__()
        await client.pause_engines()  # hold the engine so the request is surely still running
        await stream.aclose()  # the consumer leaves: the client sends ABORT
        follow_up = client.add_request(PROMPT, SHORT)
        client.unpause_engines()
        record = await follow_up
        await _finish(client)
        return first, record

    first, follow_up = run(go())
    assert first["tokens"]
    assert len(follow_up["requests"][0]["generated_tokens"]) == SHORT["num_tokens_to_generate"]
    # Without the abort the follow-up could only start after all 120 tokens of the first.
    assert serving.server.generated_tokens < LONG["num_tokens_to_generate"]
    assert not serving.server.engine.has_work and serving.server.engine.free_slots == [0]


@one_slot
def test_stream_closed_by_break_aborts_too(serving):  # noqa: F811 (the imported fixture)
    async def go_paused():
        client = await _started(serving.address)
        stream = client.add_request_streaming(PROMPT, {**LONG, "streaming_interval": 1})
        async for _item in stream:
            await client.pause_engines()
            break
        await stream.aclose()  # what `break` + garbage collection does in a plain loop
        follow_up = client.add_request(PROMPT, SHORT)
        client.unpause_engines()
        record = await follow_up
        await _finish(client)
        return record

    follow_up = run(go_paused())
    assert len(follow_up["requests"][0]["generated_tokens"]) == SHORT["num_tokens_to_generate"]
    assert serving.server.generated_tokens < LONG["num_tokens_to_generate"]


@one_slot
def test_abort_is_routed_only_to_the_holding_replica(serving):  # noqa: F811 (the imported fixture)
    """With one replica, ABORT for an unknown or finished request reaches no engine: the client
    gets an error, the engine keeps serving."""

    async def go():
        client = await _started(serving.address)
        done = await client.add_request(PROMPT, SHORT)
        client.abort_request(999)  # never submitted
        again = await client.add_request(PROMPT, SHORT)
        await _finish(client)
        return done, again, client.last_error

    done, again, last_error = run(go())
    assert done["requests"][0]["generated_tokens"] == again["requests"][0]["generated_tokens"]
    assert last_error is not None and last_error.code == "invalid_request"


@one_slot
def test_no_second_abort_after_the_stream_ended(serving):  # noqa: F811 (the imported fixture)
    """Abort twice, let the ABORTED record arrive unread, then close the stream (what the HTTP
    layer does): no further ABORT goes out, which would come back as an error."""

    async def go():
        client = await _started(serving.address)
        stream = client.add_request_streaming(PROMPT, {**LONG, "streaming_interval": 1})
        first = await stream.__anext__()
        client.abort_request(first["request_id"])
        client.abort_request(first["request_id"])  # still in flight: not sent again
        # One slot: this completes after the abort freed it, so the ABORTED record (sent
        # first, on the same sockets) has reached the client, unread in the stream's queue.
        await client.add_request(PROMPT, SHORT)
        await stream.aclose()
        after = await client.add_request(PROMPT, SHORT)  # an error would arrive before this
        await _finish(client)
        return after, client.last_error

    after, last_error = run(go())
    assert len(after["requests"][0]["generated_tokens"]) == SHORT["num_tokens_to_generate"]
    assert last_error is None
