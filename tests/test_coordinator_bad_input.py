"""Hardened message handling: after every kind of bad input the coordinator still serves.

Each case sends one bad message, checks the answer (an ERROR with the right code for peers
that speak our protocol, silence for Megatron peers), then checks that a valid request from a
fresh client still completes.
"""

from __future__ import annotations

import msgspec
import pytest
import zmq
from conftest import Peer, ThreadedCoordinator, register, stop_with_raw_engines

from megatron_coord import SamplingParams

PARAMS = SamplingParams(num_tokens_to_generate=2).serialize()
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def served():
    """One coordinator (2 fake engines, small max message size) shared by the client cases."""
    from conftest import start_coordinator

    from megatron_coord.testing.fake_engine import spawn

    address, process, ready = start_coordinator(2, max_message_bytes=MAX_BYTES)
    engines = [spawn(address, rank) for rank in range(2)]
    assert ready.wait(60)
    yield address
    for engine in engines:
        engine.kill()
        engine.wait()
    process.kill()
    process.join()


def assert_still_serving(address: str) -> None:
    peer = Peer(address).connect_ours()
    peer.send(3, 1, "still here", PARAMS)
    header, request_id, record = peer.recv()
    assert (header, request_id, record["requests"][0]["generated_text"]) == (4, 1, "st")
    peer.close()


def expect_error(peer: Peer, code: str, request_id=None) -> str:
    header, rid, got_code, message = peer.recv()
    assert (header, rid, got_code) == (100, request_id, code), message
    assert message
    return message


BAD_FRAMES = [
    ("not msgpack", [b"\xc1"], "malformed", None),
    ("truncated msgpack", [b"\x93\x03\x01"], "malformed", None),
    ("not a list", [msgspec.msgpack.encode({"header": 3})], "malformed", None),
    ("empty list", [msgspec.msgpack.encode([])], "malformed", None),
    # The id is echoed when the frame has one where a request id goes, so the client can match it.
    ("header not an int", [msgspec.msgpack.encode(["SUBMIT", 1])], "malformed", 1),
    ("unknown header", [msgspec.msgpack.encode([99])], "unknown_header", None),
    ("huge header", [msgspec.msgpack.encode([2**40])], "unknown_header", None),
    ("engine header from a client", [msgspec.msgpack.encode([4, []])], "unknown_header", None),
    ("two frames", [msgspec.msgpack.encode([1]), b"extra"], "malformed", None),
    ("empty frame", [b""], "malformed", None),
    ("submit missing a field", [msgspec.msgpack.encode([3, 7, "hi"])], "malformed", 7),
    ("submit extra field", [msgspec.msgpack.encode([3, 7, "hi", {}, 1])], "malformed", 7),
    ("request id a float", [msgspec.msgpack.encode([3, 1.5, "hi", {}])], "malformed", None),
    ("prompt a number", [msgspec.msgpack.encode([3, 7, 5, {}])], "invalid_request", 7),
    ("prompt empty", [msgspec.msgpack.encode([3, 7, "", {}])], "invalid_request", 7),
    ("prompt empty list", [msgspec.msgpack.encode([3, 7, [], {}])], "invalid_request", 7),
    ("negative token id", [msgspec.msgpack.encode([3, 7, [1, -2], {}])], "invalid_request", 7),
    ("token id a string", [msgspec.msgpack.encode([3, 7, [1, "x"], {}])], "invalid_request", 7),
    ("params not a map", [msgspec.msgpack.encode([3, 7, "hi", [1]])], "invalid_request", 7),
    (
        "unknown param",
        [msgspec.msgpack.encode([3, 7, "hi", {"temprature": 1}])],
        "invalid_request",
        7,
    ),
    (
        "param wrong type",
        [msgspec.msgpack.encode([3, 7, "hi", {"top_k": "1"}])],
        "invalid_request",
        7,
    ),
    (
        "param out of range",
        [msgspec.msgpack.encode([3, 7, "hi", {"top_p": 2.0}])],
        "invalid_request",
        7,
    ),
    ("control with fields", [msgspec.msgpack.encode([5, None])], "malformed", None),
    ("abort unknown id", [msgspec.msgpack.encode([104, 12345])], "invalid_request", 12345),
    ("abort without id", [msgspec.msgpack.encode([104])], "malformed", None),
    ("connect with junk", [msgspec.msgpack.encode([1, "v2"])], "malformed", "v2"),
]


@pytest.mark.parametrize(
    "frames,code,request_id", [c[1:] for c in BAD_FRAMES], ids=[c[0] for c in BAD_FRAMES]
)
def test_bad_client_frame_is_answered_and_serving_continues(served, frames, code, request_id):
    peer = Peer(served).connect_ours()
    peer.send_raw(*frames)
    expect_error(peer, code, request_id)
    # The same client can still use the coordinator after its mistake.
    peer.send(3, 2, "again", PARAMS)
    assert peer.recv()[:2] == [4, 2]
    peer.close()
    assert_still_serving(served)


def test_sender_that_never_connected_gets_not_connected(served):
    peer = Peer(served)
    peer.send(3, 1, "hi", PARAMS)
    expect_error(peer, "not_connected", 1)
    peer.send_raw(b"\xc1")
    expect_error(peer, "malformed")
    assert_still_serving(served)


def test_megatron_client_never_receives_our_headers(served):
    peer = Peer(served)
    peer.send(1)  # Megatron's bare CONNECT
    assert peer.recv() == [2]
    for frame in (b"\xc1", msgspec.msgpack.encode([99]), msgspec.msgpack.encode([3, 1, 5, {}])):
        peer.send_raw(frame)
    assert not peer.poll(300), "a Megatron client got an answer it cannot parse"
    peer.send(3, 1, "fine", PARAMS)
    header, request_id, record = peer.recv()
    assert (header, request_id, record["requests"][0]["generated_text"]) == (4, 1, "fi")


def test_duplicate_in_flight_request_id(served):
    peer = Peer(served).connect_ours()
    peer.send(5)  # pause: the fake engines hold new requests until UNPAUSE
    assert peer.recv() == [6]
    peer.send(3, "dup", "first", PARAMS)
    peer.send(3, "dup", "second", PARAMS)
    expect_error(peer, "duplicate_request_id", "dup")
    peer.send(7)
    header, request_id, record = peer.recv()
    assert (header, request_id, record["requests"][0]["prompt"]) == (4, "dup", "first")
    # Once finished, the id may be reused.
    peer.send(3, "dup", "third", PARAMS)
    assert peer.recv()[2]["requests"][0]["prompt"] == "third"
    assert_still_serving(served)


def test_oversized_message_is_refused_without_harm(served):
    peer = Peer(served, timeout_ms=500).connect_ours()
    peer.send(3, 1, "x" * (MAX_BYTES * 2), PARAMS)
    with pytest.raises(zmq.Again):  # libzmq drops the connection; nothing is routed
        peer.recv()
    peer.close()
    assert_still_serving(served)


def test_client_that_disconnects_before_its_reply(served):
    for _ in range(3):
        peer = Peer(served).connect_ours()
        for i in range(20):
            peer.send(3, i, "bye", PARAMS)
        peer.close()
    assert_still_serving(served)


# ---------------------------------------------------------------------- bad engine input


@pytest.fixture
def raw_engine():
    """A coordinator in a thread with one raw engine of ours and a client of ours."""
    coord = ThreadedCoordinator(1)
    engine = register(coord.address, 0)
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    yield coord, engine, client
    coordinator = stop_with_raw_engines(coord, client, [engine])
    assert coordinator.request_id_to_client_id == {}
    assert coordinator.state.requests.inflight == {}


def roundtrip(engine: Peer, client: Peer, request_id) -> None:
    """A valid request still completes through the raw engine."""
    client.send(3, request_id, [80, 81], PARAMS)
    _, rid, prompt, _ = engine.recv()
    assert prompt == [80, 81]
    reply = {"request_id": rid, "prompt": None, "prompt_tokens": prompt, "generated_tokens": [80]}
    engine.send(4, [{"requests": [reply]}])
    header, got_id, record = client.recv()
    assert (header, got_id, record["requests"][0]["generated_text"]) == (4, request_id, "P")


BAD_ENGINE_FRAMES = [
    ("not msgpack", b"\xc1", "malformed"),
    ("reply not a list of maps", msgspec.msgpack.encode([4, "records"]), "malformed"),
    ("reply missing records", msgspec.msgpack.encode([4]), "malformed"),
    ("unknown header", msgspec.msgpack.encode([77]), "unknown_header"),
    ("client header from an engine", msgspec.msgpack.encode([3, 1, "x", {}]), "unknown_header"),
    ("heartbeat not a map", msgspec.msgpack.encode([102, 5]), "malformed"),
    ("partial reply malformed", msgspec.msgpack.encode([103, [[1, "x"]]]), "malformed"),
    ("error with wrong fields", msgspec.msgpack.encode([100, "x"]), "malformed"),
    ("ack with fields", msgspec.msgpack.encode([6, 1]), "malformed"),
]


@pytest.mark.parametrize(
    "frame,code", [c[1:] for c in BAD_ENGINE_FRAMES], ids=[c[0] for c in BAD_ENGINE_FRAMES]
)
def test_bad_engine_frame_is_answered(raw_engine, frame, code):
    _, engine, client = raw_engine
    engine.send_raw(frame)
    header, _, got_code, message = engine.recv()
    assert (header, got_code) == (100, code), message
    roundtrip(engine, client, 1)


def test_reply_for_an_id_never_issued_is_dropped(raw_engine):
    _, engine, client = raw_engine
    ghost = {"request_id": 424242, "prompt": None, "prompt_tokens": [1], "generated_tokens": [1]}
    engine.send(4, [{"requests": [ghost]}, {"no_requests": True}, {"requests": []}])
    engine.send(100, 424242, "engine_failed", "ghost")
    engine.send(103, [[424242, [1]]])
    assert not client.poll(200)
    roundtrip(engine, client, 2)


@pytest.mark.parametrize("tokens", ["BB", [1.5], [-1], [66, "x"], None, [300], {"a": 1}])
def test_reply_with_malformed_tokens_fails_only_that_request(raw_engine, tokens):
    _, engine, client = raw_engine
    client.send(3, "a", [65], PARAMS)
    client.send(3, "b", [66], PARAMS)
    _, rid_a, _, _ = engine.recv()
    _, rid_b, _, _ = engine.recv()
    good = {
        "request_id": rid_a,
        "prompt": None,
        "prompt_tokens": ["tensor", [65]],
        "generated_tokens": [66],
    }
    bad = {"request_id": rid_b, "prompt": None, "prompt_tokens": [66], "generated_tokens": tokens}
    engine.send(4, [{"requests": [good]}, {"requests": [bad]}])
    replies = {}
    for _ in range(2):
        message = client.recv()
        replies[message[1]] = message
    assert replies["a"][2]["requests"][0]["generated_text"] == "B"
    assert replies["b"][0] == 100 and replies["b"][2] == "engine_failed"
    roundtrip(engine, client, 3)


def test_heartbeat_is_stored(raw_engine):
    coord, engine, client = raw_engine
    engine.send(102, {"queued": 3, "active": 1})
    roundtrip(engine, client, 4)  # the heartbeat was handled before this round trip
    (info,) = coord.coordinator.engines.values()
    assert info.load == {"queued": 3, "active": 1}


def test_megatron_engine_never_receives_our_headers():
    coord = ThreadedCoordinator(1)
    engine = Peer(coord.address, identity=b"mp-coord-0")
    engine.send_raw(b"")
    assert coord.ready.wait(30)
    engine.send_raw(b"\xc1")
    engine.send(77)
    assert not engine.poll(300)
    client = Peer(coord.address).connect_ours()
    stop_with_raw_engines(coord, client, [engine])
