"""Busy is not dead: a real replica (EngineServer over the continuous-batching engine and a tiny
Llama) with its default settings, against a coordinator whose engine timeout (0.5 s) is half
the replica's default heartbeat interval, and whose every model step lasts three engine
timeouts, keeps heartbeating (at the cadence REGISTER_ACK gave it) from its step thread, so it
is never declared lost and every request gets its result; a step that runs past ``max_step_s``
is a hang, and the replica is declared lost. A replica taken for dead while it lived (frozen
mid-step) registers again with what it holds and loses nothing (issue 22)."""

from __future__ import annotations

import threading
import time

from conftest import Peer, elastic_coordinator, query_stats, stop, wait_stats

from megatron_coord.engine import InferenceEngine
from megatron_coord.engine.server import EngineServer
from megatron_coord.liveness_contract import DEFAULT_HEARTBEAT_INTERVAL_S
from megatron_coord.parallel_state import single_process_state

ENGINE_TIMEOUT_S = 0.5
STEP_S = 3 * ENGINE_TIMEOUT_S


def _slow_steps(engine: InferenceEngine) -> None:
    """The fault injection: every step of this engine first sleeps STEP_S (the GIL is released,
    as in a long torch kernel). Only this test's engine object pays for it."""
    real_step = engine.compute_step  # what the server's step guard runs

    def slow_step():
        time.sleep(STEP_S)
        return real_step()

    engine.compute_step = slow_step


def _serve(model, coordinator_address: str, max_step_s: float, slow: bool = True):
    """A replica with a launch's default settings (heartbeats every second unless the
    coordinator asks for more, a one-second idle wait), serving in a thread."""
    engine = InferenceEngine(model, max_batch_size=4, max_seq_len=64)
    if slow:
        _slow_steps(engine)
    server = EngineServer(
        engine,
        single_process_state(),
        coordinator_address,
        heartbeat_interval_s=DEFAULT_HEARTBEAT_INTERVAL_S,
        max_step_s=max_step_s,
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


def _stop(server: EngineServer, thread: threading.Thread) -> None:
    server.request_shutdown()
    thread.join(30)
    assert not thread.is_alive()
    server.close()


def test_steps_three_engine_timeouts_long_lose_no_replica(model, tokenizer):
    coord, client = elastic_coordinator(tokenizer=tokenizer, engine_timeout=ENGINE_TIMEOUT_S)
    server, thread = _serve(model, coord.address, max_step_s=60.0)
    try:
        wait_stats(client, lambda s: len(s["engines"]) == 1, "the replica registered")
        prompts = ["Hello world", "The quick brown fox", "abc"]
        for request_id, prompt in enumerate(prompts):
            client.send(3, request_id, prompt, {"top_k": 1, "num_tokens_to_generate": 2})
        replies = {}
        while len(replies) < len(prompts):
            message = client.recv()
            assert message[0] == 4, message  # a result, never an error
            replies[message[1]] = message[2]["requests"][0]
        assert all(len(r["generated_tokens"]) == 2 for r in replies.values())
        assert server.steps >= 2  # each lasted STEP_S, three engine timeouts
        stats = query_stats(client)
        assert stats["engines_lost"] == 0 and stats["requests_resubmitted"] == 0
        assert len(stats["engines"]) == 1
        # It said its default interval, and beats at the coordinator's cadence instead.
        assert stats["engines"][0]["info"]["heartbeat_interval"] == DEFAULT_HEARTBEAT_INTERVAL_S
        assert server.heartbeats.interval_s == ENGINE_TIMEOUT_S / 4
    finally:
        _stop(server, thread)
        stop(coord, client)  # no engine left: STOP is acknowledged at once
        client.close()


def test_a_step_past_max_step_time_is_a_hang(model, tokenizer):
    coord, client = elastic_coordinator(
        tokenizer=tokenizer, engine_timeout=ENGINE_TIMEOUT_S, failover_wait=0
    )  # the request fails at once (it does not wait for the replica to come back)
    server, thread = _serve(model, coord.address, max_step_s=0.2)
    observer = Peer(coord.address).connect_ours()  # STATS here: the client's error stays queued
    try:
        wait_stats(observer, lambda s: len(s["engines"]) == 1, "the replica registered")
        client.send(3, 0, "Hello world", {"top_k": 1, "num_tokens_to_generate": 2})
        # Beats stop 0.2 s into the step and the loop beats again once it ends: only silence
        # inside the step (the hang) can make the replica lost.
        stats = wait_stats(observer, lambda s: s["engines_lost"] == 1, "the hung replica is lost")
        assert stats["engines"] == []
        error = client.recv()
        assert error[:3] == [100, 0, "no_engine"], error
    finally:
        observer.close()
        _stop(server, thread)
        stop(coord, client)  # no engine left: STOP is acknowledged at once
        client.close()


def _freeze_one_step(server: EngineServer, step: int, seconds: float) -> None:
    """The fault injection: the replica's ``step``-th model step stops the whole process for
    ``seconds``, as a GC pause or SIGSTOP would: nothing runs, not even the heartbeat thread
    (held at its lock), while its socket stays open."""
    engine = server.engine
    real_step = engine.compute_step
    count = [0]

    def frozen_step():
        count[0] += 1
        if count[0] == step:
            with server.heartbeats.during_steps._lock:
                time.sleep(seconds)
        return real_step()

    engine.compute_step = frozen_step


def test_a_replica_taken_for_dead_mid_step_keeps_its_requests(model, tokenizer):
    coord, client = elastic_coordinator(tokenizer=tokenizer, engine_timeout=ENGINE_TIMEOUT_S)
    server, thread = _serve(model, coord.address, max_step_s=60.0, slow=False)
    observer = Peer(coord.address).connect_ours()
    try:
        wait_stats(observer, lambda s: len(s["engines"]) == 1, "the replica registered")
        _freeze_one_step(server, step=4, seconds=2 * ENGINE_TIMEOUT_S)
        streams = {0: [], 2: []}
        for request_id in range(3):
            params = {"top_k": 1, "num_tokens_to_generate": 12}
            if request_id in streams:
                params["streaming_interval"] = 1
            client.send(3, request_id, [5 + request_id, 6, 7], params)
        finals = {}
        while len(finals) < 3:
            message = client.recv()
            if message[0] == 103:
                streams[message[1]] += message[2]
                continue
            assert message[0] == 4, message  # a result, never an error
            assert message[1] not in finals, message  # and one each
            finals[message[1]] = message[2]["requests"][0]["generated_tokens"]
        for request_id, tokens in finals.items():
            assert len(tokens) == 12
            if request_id in streams:  # each token once, in order, all but the record's last
                assert streams[request_id] == tokens[:-1], (streams[request_id], tokens)
        assert not client.poll(300)
        stats = wait_stats(observer, lambda s: s["engines_rejoined"] == 1, "it came back")
        assert stats["engines_lost"] == 1 and stats["requests_adopted"] == 3
        assert len(stats["engines"]) == 1 and stats["requests_resubmitted"] == 0
        client.send(3, 9, [5, 6, 7], {"top_k": 1, "num_tokens_to_generate": 12})  # it serves on
        reply = client.recv()
        assert reply[:2] == [4, 9] and reply[2]["requests"][0]["generated_tokens"] == finals[0]
    finally:
        observer.close()
        _stop(server, thread)
        stop(coord, client)
        client.close()
