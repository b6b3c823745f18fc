"""Bounded outstanding work and per-request deadlines, over real sockets.

Overload: 10x more requests than the coordinator's capacity arrive while the engines hold
everything (paused); exactly the capacity is admitted, every other request gets one
``overloaded`` ERROR at once, and the admitted ones complete after UNPAUSE.
"""

from __future__ import annotations

import pytest
from conftest import (
    Peer,
    elastic_coordinator,
    query_stats,
    register,
    stop,
    stop_with_raw_engines,
    wait_stats,
)

from megatron_coord.coordinator.limits import DeadlineQueue, Limits
from megatron_coord.testing.fake_engine import spawn

PARAMS = {"num_tokens_to_generate": 2}
CAPACITY = 8


def _paused(client: Peer) -> None:
    client.send(5)
    assert client.recv() == [6]


def test_overload_with_ten_times_the_capacity():
    coord, client = elastic_coordinator(max_outstanding=CAPACITY)
    engines = [spawn(coord.address, rank) for rank in range(2)]
    try:
        wait_stats(client, lambda s: len(s["engines"]) == 2, "engines joined")
        _paused(client)
        for i in range(10 * CAPACITY):
            client.send(3, i, f"r{i}", PARAMS)
        refused = [client.recv() for _ in range(9 * CAPACITY)]
        assert all(m[0] == 100 and m[2] == "overloaded" for m in refused)
        assert sorted(m[1] for m in refused) == list(range(CAPACITY, 10 * CAPACITY))
        stats = query_stats(client)
        assert stats["requests_in_flight"] == CAPACITY
        assert stats["maps"]["submitted"] == CAPACITY  # nothing queued beyond the limit
        client.send(7)
        done = [client.recv() for _ in range(CAPACITY)]
        assert sorted(m[1] for m in done) == list(range(CAPACITY))
        assert all(m[0] == 4 for m in done)
        assert not client.poll(200)
        # Capacity is back once they finished.
        client.send(3, "again", "ok", PARAMS)
        assert client.recv()[:2] == [4, "again"]
        stop(coord, client)
        for engine in engines:
            assert engine.wait(30) == 0
    finally:
        for engine in engines:
            engine.kill()


def test_per_engine_limit_spills_to_a_free_engine_then_refuses():
    coord, client = elastic_coordinator(max_outstanding_per_engine=2)
    busy = register(coord.address, 0)
    idle = register(coord.address, 1)
    wait_stats(client, lambda s: len(s["engines"]) == 2, "engines joined")
    for i in range(5):
        client.send(3, i, "x", PARAMS)
    refused = client.recv()
    assert refused[:3] == [100, 4, "overloaded"]
    assert "per-engine" in refused[3]
    got = [busy.recv()[1] for _ in range(2)] + [idle.recv()[1] for _ in range(2)]
    assert sorted(got) == [0, 1, 2, 3]
    for engine, ids in ((busy, got[:2]), (idle, got[2:])):
        records = [{"requests": [{"request_id": r, "generated_tokens": [120]}]} for r in ids]
        engine.send(4, records)
    assert sorted(client.recv()[1] for _ in range(4)) == [0, 1, 2, 3]
    stop_with_raw_engines(coord, client, [busy, idle])


def test_request_timeout_fails_the_request_and_aborts_it_on_the_engine():
    coord, client = elastic_coordinator(request_timeout=0.3)
    engine = register(coord.address, 0)
    wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
    client.send(3, "slow", "x", PARAMS)
    client.send(3, "fast", "y", PARAMS)
    assert engine.recv()[1] == 0 and engine.recv()[1] == 1
    engine.send(4, [{"requests": [{"request_id": 1, "generated_tokens": [121]}]}])
    assert client.recv()[:2] == [4, "fast"]
    reply = client.recv()  # after 0.3 s
    assert reply[:3] == [100, "slow", "timeout"]
    assert engine.recv() == [104, 0]
    engine.send(4, [{"requests": [{"request_id": 0, "generated_tokens": [1]}]}])  # too late
    assert not client.poll(200)
    stats = query_stats(client)
    assert stats["maps"]["request_engine"] == 0 and stats["maps"]["deadlines"] == 0
    stop_with_raw_engines(coord, client, [engine])


def test_limit_options_are_validated():
    with pytest.raises(ValueError, match="max_outstanding"):
        Limits(max_outstanding=0)
    with pytest.raises(ValueError, match="request_timeout"):
        Limits(request_timeout=-1)
    with pytest.raises(ValueError, match="request_timeout"):
        Limits(request_timeout=True)


def test_deadline_queue_skips_finished_requests_and_compacts():
    queue = DeadlineQueue()
    for request_id in range(3000):
        queue.add(float(request_id), request_id)
    alive = {5: None, 2999: None}
    assert queue.expired(10.0, alive) == [5]
    queue.compact(alive)
    assert len(queue) == 1 and queue.next_deadline() == 2999.0
