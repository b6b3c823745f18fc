"""Engine and client faults against a coordinator with data_parallel_size=0 (engines join and
leave at any time), with real sockets: fake-engine processes killed with SIGKILL, raw engines
that fall silent or close, streamed requests whose engine dies, clients that vanish."""

from __future__ import annotations

import os
import signal
import time

from conftest import (
    Peer,
    ThreadedCoordinator,
    elastic_coordinator,
    query_stats,
    register,
    stop,
    wait_stats,
)

from megatron_coord.testing.fake_engine import spawn

PARAMS = {"num_tokens_to_generate": 3}


def test_requests_before_any_engine_wait_for_one_then_are_served():
    """Replicas still loading when clients start: requests are held, not refused."""
    coord, client = elastic_coordinator(wait_for_engine=30)
    client.send(3, "early", "hi", PARAMS)
    client.send(3, "given-up", "hi", PARAMS)
    client.send(104, "given-up")  # an abort of a held request ends it at once
    error = client.recv()
    assert error[:3] == [100, "given-up", "aborted"], error
    assert not client.poll(300)  # "early" is held, not answered
    assert query_stats(client)["maps"]["orphans"] == 1
    engine = spawn(coord.address, 0)
    try:
        reply = client.recv()
        assert reply[:2] == [4, "early"] and reply[2]["requests"][0]["generated_text"] == "hih"
        stats = query_stats(client)
        assert stats["requests_resubmitted"] == 0 and stats["maps"]["orphans"] == 0
        stop(coord, client)
        assert engine.wait(30) == 0
    finally:
        engine.kill()


def test_a_request_waits_for_an_engine_at_most_wait_for_engine():
    coord, client = elastic_coordinator(wait_for_engine=0.3)
    started = time.monotonic()
    client.send(3, "x", "hi", PARAMS)
    error = client.recv()
    assert time.monotonic() - started >= 0.3
    assert error[:3] == [100, "x", "no_engine"] and "registered within 0.3 s" in error[3]
    assert query_stats(client)["maps"]["orphans"] == 0
    stop(coord, client)


def test_no_engine_is_refused_at_once_without_a_wait_then_a_joining_engine_serves():
    coord, client = elastic_coordinator(wait_for_engine=0)
    client.send(3, "early", "hi", PARAMS)
    reply = client.recv()
    assert reply[:3] == [100, "early", "no_engine"]
    engine = spawn(coord.address, 0)
    try:
        wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
        client.send(3, "late", "hi", PARAMS)
        reply = client.recv()
        assert reply[0] == 4 and reply[1] == "late"
        assert reply[2]["requests"][0]["generated_text"] == "hih"
        stop(coord, client)
        assert engine.wait(30) == 0
    finally:
        engine.kill()


def test_kill9_of_a_megatron_protocol_engine_is_noticed_from_its_socket():
    """Megatron engines send no heartbeats: the closed connection alone tells."""
    coord = ThreadedCoordinator(0, engine_timeout=60.0)  # silence could not explain it
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    engines = [spawn(coord.address, rank, megatron_style=True) for rank in range(2)]
    try:
        stats = wait_stats(client, lambda s: len(s["engines"]) == 2, "engines joined")
        client.send(5)  # PAUSE: the fake engines hold what they get
        assert client.recv() == [6]
        for i in range(10):
            client.send(3, i, f"p{i}", PARAMS)
        stats = wait_stats(client, lambda s: s["requests_in_flight"] == 10, "all routed")
        assert [e["outstanding_requests"] for e in stats["engines"]] == [5, 5]
        victim = engines[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        stats = wait_stats(client, lambda s: s["engines_lost"] == 1, "death noticed")
        assert len(stats["engines"]) == 1
        assert stats["engines"][0]["outstanding_requests"] == 10
        assert stats["requests_resubmitted"] == 5
        client.send(7)  # UNPAUSE: the survivor answers every request, each exactly once
        answers = [client.recv() for _ in range(10)]
        assert sorted(a[1] for a in answers) == list(range(10))
        assert all(a[0] == 4 for a in answers)
        for a in answers:
            assert a[2]["requests"][0]["generated_text"] == (f"p{a[1]}" * 3)[:3]
        assert not client.poll(300)
        assert query_stats(client)["maps"]["request_engine"] == 0
        stop(coord, client)
        assert engines[1].wait(30) == 0
    finally:
        for engine in engines:
            engine.kill()


def test_silent_engine_is_declared_dead_requests_move_and_it_can_come_back():
    coord, client = elastic_coordinator(engine_timeout=0.5)
    silent = register(coord.address, 0)
    silent.send(102, {"queued": 0})  # a heartbeating engine is watched for silence
    wait_stats(client, lambda s: len(s["engines"]) == 1, "silent engine joined")
    client.send(3, "a", [65, 66], PARAMS)
    assert silent.recv()[:3] == [3, 0, [65, 66]]
    live = spawn(coord.address, 1)  # never heartbeats, so never "silent"
    try:
        reply = client.recv()  # the silent engine is dead after 0.5 s; "a" moved to `live`
        assert reply[0] == 4 and reply[1] == "a"
        assert reply[2]["requests"][0]["generated_tokens"] == [65, 66, 65]
        assert silent.recv() == [104, 0]  # told to drop it, in case it still lives
        stats = query_stats(client)
        assert stats["engines_lost"] == 1 and stats["requests_resubmitted"] == 1
        assert len(stats["engines"]) == 1
        silent.send(4, [{"requests": [{"request_id": 0, "generated_tokens": [1]}]}])
        assert not client.poll(300)  # a late reply from a dead engine is dropped
        silent.send(102, {"queued": 0, "data_parallel_rank": 0})  # it lives: back in
        wait_stats(client, lambda s: len(s["engines"]) == 2, "silent engine came back")
        stop(coord, client)
        assert live.wait(30) == 0
    finally:
        live.kill()
        silent.close()


def test_streamed_request_fails_but_unstarted_one_moves_when_engine_closes():
    coord, client = elastic_coordinator()
    doomed = register(coord.address, 0)
    wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
    client.send(3, "s", "ab", {**PARAMS, "streaming_interval": 1})
    client.send(3, "n", "cd", PARAMS)
    assert doomed.recv()[1] == 0 and doomed.recv()[1] == 1
    doomed.send(103, [[0, [120]]])
    assert client.recv() == [103, "s", [120], "x"]  # part of "s" reached the client
    live = spawn(coord.address, 1)
    try:
        wait_stats(client, lambda s: len(s["engines"]) == 2, "second engine joined")
        doomed.close()
        replies = {m[1]: m for m in (client.recv(), client.recv())}
        assert replies["s"][0] == 100 and replies["s"][2] == "engine_failed"
        assert "1 token(s) were streamed" in replies["s"][3]
        assert replies["n"][0] == 4
        assert replies["n"][2]["requests"][0]["generated_text"] == "cdc"
        assert not client.poll(300)
        stats = query_stats(client)
        assert stats["maps"]["request_engine"] == 0 and stats["maps"]["streams"] == 0
        stop(coord, client)
        assert live.wait(30) == 0
    finally:
        live.kill()


def test_vanished_client_requests_are_aborted_and_forgotten():
    coord = ThreadedCoordinator(0)
    assert coord.ready.wait(30)
    engine = register(coord.address, 0)
    watcher = Peer(coord.address).connect_ours()
    wait_stats(watcher, lambda s: len(s["engines"]) == 1, "engine joined")
    leaver = Peer(coord.address).connect_ours()
    for i in range(3):
        leaver.send(3, i, "zz", PARAMS)
    assert sorted(engine.recv()[1] for _ in range(3)) == [0, 1, 2]
    assert query_stats(watcher)["clients"] == 2
    leaver.close()
    assert sorted(engine.recv()[1:] for _ in range(3)) == [[0], [1], [2]]  # ABORTs
    stats = query_stats(watcher)
    assert stats["clients"] == 1
    assert {k: v for k, v in stats["maps"].items() if k != "peer_fds"} == dict.fromkeys(
        stats["maps"].keys() - {"peer_fds"}, 0
    )
    # The engine's late replies for them are dropped; the coordinator still serves.
    engine.send(4, [{"requests": [{"request_id": 1, "generated_tokens": [1]}]}])
    watcher.send(3, "after", "q", PARAMS)
    submit = engine.recv()
    assert submit[0] == 3 and submit[1] == 3
    engine.send(4, [{"requests": [{"request_id": 3, "generated_tokens": [113]}]}])
    reply = watcher.recv()
    assert reply[:2] == [4, "after"] and reply[2]["requests"][0]["generated_text"] == "q"
    engine.close()
    coord.coordinator.request_shutdown()
    watcher.send(105)  # wakes the loop, which then shuts down (nothing in flight)
    coord.join()


def test_record_without_prompt_tokens_fails_only_that_request():
    """A token-prompt record lacking prompt_tokens is malformed: engine_failed, no crash."""
    coord, client = elastic_coordinator()
    engine = register(coord.address, 0)
    wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
    client.send(3, "bad", [65], PARAMS)
    client.send(3, "good", [66], PARAMS)
    ids = [engine.recv()[1] for _ in range(2)]
    bad = {"request_id": ids[0], "generated_tokens": [1]}
    good = {"request_id": ids[1], "prompt_tokens": [66], "generated_tokens": [67]}
    engine.send(4, [{"requests": [bad]}, {"requests": [good]}])
    replies = {m[1]: m for m in (client.recv(), client.recv())}
    assert replies["bad"][:3] == [100, "bad", "engine_failed"]
    assert replies["good"][2]["requests"][0]["generated_text"] == "C"
    engine.close()
    wait_stats(client, lambda s: not s["engines"], "engine left")
    stop(coord, client)


def test_engine_joining_while_paused_is_paused_too():
    coord, client = elastic_coordinator()
    engines = [spawn(coord.address, 0)]
    try:
        wait_stats(client, lambda s: len(s["engines"]) == 1, "first engine joined")
        client.send(5)
        assert client.recv() == [6]
        engines.append(spawn(coord.address, 1))  # joins a paused service
        wait_stats(client, lambda s: len(s["engines"]) == 2, "second engine joined")
        for i in range(4):
            client.send(3, i, "w", PARAMS)
        stats = wait_stats(client, lambda s: s["requests_in_flight"] == 4, "routed")
        assert [e["outstanding_requests"] for e in stats["engines"]] == [2, 2]
        assert not client.poll(300)  # neither engine answers while paused
        client.send(7)
        assert sorted(client.recv()[1] for _ in range(4)) == [0, 1, 2, 3]
        stop(coord, client)
        for engine in engines:
            assert engine.wait(30) == 0
    finally:
        for engine in engines:
            engine.kill()


def test_when_every_engine_is_lost_resubmittable_requests_wait_for_one():
    """The only engine dies holding requests: they wait (failover_wait), and an engine that
    registers gets them, unchanged; each is answered exactly once."""
    coord, client = elastic_coordinator(failover_wait=30.0)
    first = register(coord.address, 0)
    try:
        wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
        for i in range(3):
            client.send(3, i, [104, 105], PARAMS)
        held = [first.recv() for _ in range(3)]
        assert [m[0] for m in held] == [3, 3, 3]
        first.close()  # its connection closes: every replica is lost
        stats = wait_stats(client, lambda s: s["maps"]["orphans"] == 3, "requests wait")
        assert stats["engines"] == [] and stats["requests_in_flight"] == 3
        assert not client.poll(200)  # no error yet
        second = register(coord.address, 1)
        resent = [second.recv() for _ in range(3)]
        assert sorted(m[1] for m in resent) == sorted(m[1] for m in held)
        assert all(r[2:] == h[2:] for r, h in zip(resent, sorted(held), strict=True))
        records = [
            {
                "requests": [
                    {"request_id": m[1], "prompt_tokens": [104, 105], "generated_tokens": [33]}
                ]
            }
            for m in resent
        ]
        second.send(4, records)
        answers = [client.recv() for _ in range(3)]
        assert sorted(a[1] for a in answers) == [0, 1, 2] and all(a[0] == 4 for a in answers), (
            answers
        )
        assert not client.poll(200)
        stats = query_stats(client)
        assert stats["requests_resubmitted"] == 3 and stats["maps"]["orphans"] == 0
        second.close()
        stop(coord, client)
    finally:
        first.close()


def test_requests_that_wait_in_vain_fail_with_no_engine():
    coord, client = elastic_coordinator(failover_wait=0.3)
    engine = register(coord.address, 0)
    wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
    client.send(3, "x", [104], PARAMS)
    assert engine.recv()[0] == 3
    engine.close()
    error = client.recv()
    assert error[:3] == [100, "x", "no_engine"] and "within 0.3 s" in error[3]
    assert query_stats(client)["maps"]["orphans"] == 0
    stop(coord, client)


def test_megatron_engines_are_never_sent_abort():
    """Megatron's engines crash on a header they do not know (``Headers(104)``): a client's
    ABORT ends the request at once (its engine's late reply is dropped), and a vanished
    client's requests are forgotten, with nothing sent to the engine."""
    coord, client = elastic_coordinator()
    engine = Peer(coord.address, identity=b"mp-coord-0", timeout_ms=500)
    engine.send_raw(b"")
    wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
    client.send(3, "a", [65], PARAMS)
    request_id = engine.recv()[1]
    client.send(104, "a")
    assert client.recv()[:3] == [100, "a", "aborted"]
    gone = Peer(coord.address).connect_ours()
    gone.send(3, "b", [66], PARAMS)
    assert engine.recv()[0] == 3
    gone.sock.close()
    wait_stats(client, lambda s: s["requests_in_flight"] == 0, "the vanished client's request")
    record = {"request_id": request_id, "prompt_tokens": [65], "generated_tokens": [66]}
    engine.send(4, [{"requests": [record]}])  # the aborted request's late reply: dropped
    client.send(3, "c", [67], PARAMS)
    message = engine.recv()
    assert message[0] == 3, message  # no ABORT (104) came before it
    engine.sock.close()
    wait_stats(client, lambda s: not s["engines"], "engine left")
    stop(coord, client)
