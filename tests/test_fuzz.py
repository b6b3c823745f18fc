"""10,000 random and mutated frames (seeded) interleaved with valid traffic.

A fuzzing client (and a few strangers and an oversize sender) throw random bytes, mutations of
valid messages, well-formed msgpack of the wrong shape and multi-frame messages at a coordinator
served by two fake-engine processes, while a well-behaved client submits real requests. After
it: every valid request was answered exactly once with the right text, the coordinator is still
serving, and its per-request maps are empty. A registered engine that sends junk is survived too.
"""

from __future__ import annotations

import random

import msgspec
from conftest import Peer, ThreadedCoordinator, query_stats, register, stop, wait_stats

from megatron_coord.testing.fake_engine import spawn

N_FRAMES = 10_000
MAX_BYTES = 4 * 1024 * 1024  # fake engines batch many records per reply: room for them
CONTROL = {5, 7, 8, 9, 10}  # valid control signals act on every engine: not fuzz
SEED = 20261127


def _valid_messages(rng: random.Random) -> list[bytes]:
    encode = msgspec.msgpack.encode
    return [
        encode([3, rng.randrange(1000), "hello", {"num_tokens_to_generate": 2}]),
        encode([3, "x", [1, 2, 3], {"temperature": 0.5, "top_k": 3}]),
        encode([104, rng.randrange(1000)]),
        encode([105]),
        encode([1, {"protocol": 1}]),
        encode([4, [{"requests": [{"request_id": 0, "generated_tokens": [1]}]}]]),
        encode([103, [[0, [1, 2]]]]),
        encode([102, {"queued": 1}]),
    ]


def _random_object(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randrange(-(2**40), 2**40)
    if kind == 1:
        return rng.random() * 1e6
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(8)))
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
    if kind == 5:
        return [_random_object(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 6:
        return {str(rng.randrange(9)): _random_object(rng, depth + 1) for _ in range(3)}
    return [rng.choice([1, 3, 4, 100, 101, 102, 103, 104, 105, 255]), _random_object(rng, 3)]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif op == 2 and data:
            del data[rng.randrange(len(data))]
        else:
            data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def _fuzz_frame(rng: random.Random, valid: list[bytes]) -> list[bytes]:
    kind = rng.randrange(10)
    if kind < 3:
        frames = [bytes(rng.randrange(256) for _ in range(rng.randrange(64)))]
    elif kind < 7:
        frames = [_mutate(rng, rng.choice(valid))]
    elif kind < 9:
        frames = [msgspec.msgpack.encode(_random_object(rng))]
    else:
        frames = [rng.choice(valid), _mutate(rng, rng.choice(valid))]
    return frames


def _is_control(frame: bytes) -> bool:
    try:
        message = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False
    return (
        isinstance(message, list)
        and len(message) == 1
        and type(message[0]) is int
        and (message[0] in CONTROL)
    )


def _submit_valid(good: Peer, expected: dict[int, str]) -> None:
    """One valid request of the well-behaved client (the fake engine echoes its prompt)."""
    request_id = len(expected)
    prompt = f"ok{request_id}"
    expected[request_id] = (prompt * 3)[:3]
    good.send(3, request_id, prompt, {"num_tokens_to_generate": 3})


def _assert_answered_once(good: Peer, expected: dict[int, str]) -> None:
    """Every valid request was answered exactly once, with the right text."""
    answers: dict[int, list] = {request_id: [] for request_id in expected}
    while any(not a for a in answers.values()):
        message = good.recv()
        assert message[0] == 4, message
        answers[message[1]].append(message)
    assert not good.poll(300)  # and nothing twice
    for request_id, replies in answers.items():
        assert len(replies) == 1
        assert replies[0][2]["requests"][0]["generated_text"] == expected[request_id]


def test_ten_thousand_bad_frames_among_valid_traffic():
    rng = random.Random(SEED)
    coord = ThreadedCoordinator(0, max_message_bytes=MAX_BYTES)
    assert coord.ready.wait(30)
    good = Peer(coord.address).connect_ours()
    engines = [spawn(coord.address, rank) for rank in range(2)]
    fuzzer = Peer(coord.address).connect_ours()
    strangers = [Peer(coord.address) for _ in range(3)]
    try:
        wait_stats(good, lambda s: len(s["engines"]) == 2, "engines joined")
        valid = _valid_messages(rng)
        expected: dict[int, str] = {}
        sent = 0
        while sent < N_FRAMES:
            frames = _fuzz_frame(rng, valid)
            if any(_is_control(f) for f in frames):
                continue
            target = fuzzer if rng.random() < 0.9 else rng.choice(strangers)
            if target is not fuzzer and frames == [b""]:
                continue  # an empty frame from a stranger is a (Megatron) engine registering
            target.send_raw(*frames)
            sent += 1
            if sent % 10 == 0:
                _submit_valid(good, expected)
            if sent % 2000 == 0:  # an oversize frame: the socket drops that connection
                big = Peer(coord.address)
                big.send_raw(b"\x91" + b"\x00" * (MAX_BYTES + 1))
                big.close()
        _assert_answered_once(good, expected)
        stats = wait_stats(good, lambda s: s["requests_in_flight"] == 0, "maps drained")
        maps = {k: v for k, v in stats["maps"].items() if k != "peer_fds"}
        assert maps == dict.fromkeys(maps, 0)
        assert coord.error is None and coord.thread.is_alive()

        # A registered engine sending junk: survived, and valid traffic still flows.
        junk = register(coord.address, 9)
        wait_stats(good, lambda s: len(s["engines"]) == 3, "junk engine joined")
        for _ in range(500):
            junk.send_raw(*_fuzz_frame(rng, valid))
        junk.close()
        wait_stats(good, lambda s: len(s["engines"]) == 2, "junk engine left")
        good.send(3, "last", "end", {"num_tokens_to_generate": 3})
        reply = good.recv()
        assert reply[:2] == [4, "last"] and reply[2]["requests"][0]["generated_text"] == "end"
        # Junk that happened to be a valid request may still be on an engine: it drains.
        wait_stats(good, lambda s: s["maps"]["request_engine"] == 0, "junk's requests drained")
        stop(coord, good)
        for engine in engines:
            assert engine.wait(30) == 0
    finally:
        for engine in engines:
            engine.kill()
        for peer in (fuzzer, *strangers):
            peer.close()


def _posing_frames(rng: random.Random) -> list[bytes]:
    """What a stranger posing as an engine sends: an empty frame (Megatron's registration), a
    REGISTER of ours (valid or mutated), or a reply for a request it was never given."""
    encode = msgspec.msgpack.encode
    register_frame = encode([101, {"data_parallel_rank": rng.randrange(4), "protocol": 1}])
    kind = rng.randrange(4)
    if kind == 0:
        return [b""]
    if kind == 1:
        return [register_frame]
    if kind == 2:
        return [_mutate(rng, register_frame)]
    return [encode([4, [{"requests": [{"request_id": rng.randrange(64)}]}]])]


def test_strangers_posing_as_engines_never_swallow_requests():
    """data_parallel_size=2 with both engines in: no stranger (never CONNECTed) becomes a
    third engine by registering, and no client can register either, so every valid request
    is answered exactly once by the real engines."""
    rng = random.Random(SEED + 1)
    coord = ThreadedCoordinator(2, max_message_bytes=MAX_BYTES)
    engines = [spawn(coord.address, rank) for rank in range(2)]
    strangers = [Peer(coord.address) for _ in range(50)]
    good = client_posing = None
    try:
        assert coord.ready.wait(60)
        good = Peer(coord.address).connect_ours()
        client_posing = Peer(coord.address).connect_ours()
        expected: dict[int, str] = {}
        for sent in range(2000):
            rng.choice(strangers).send_raw(*_posing_frames(rng))
            if sent % 50 == 0:
                client_posing.send_raw(b"")  # a client cannot become an engine either
            if sent % 10 == 0:
                _submit_valid(good, expected)
        _assert_answered_once(good, expected)
        stats = query_stats(good)
        assert len(stats["engines"]) == 2 and stats["requests_in_flight"] == 0
        assert sorted(e.data_parallel_rank for e in coord.coordinator.engines.values()) == [0, 1]
        late = Peer(coord.address)  # a well-formed REGISTER is told why it is refused
        late.send(101, {"data_parallel_rank": 2, "protocol": 1})
        refusal = late.recv()
        late.close()
        assert refusal[:3] == [100, None, "overloaded"] and "engine places" in refusal[3]
        assert coord.error is None and coord.thread.is_alive()
        stop(coord, good)
        for engine in engines:
            assert engine.wait(30) == 0
    finally:
        for engine in engines:
            engine.kill()
        for peer in (*strangers, good, client_posing):
            if peer is not None:
                peer.close()
