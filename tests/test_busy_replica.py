"""Busy is not dead: a real replica (EngineServer over the continuous-batching engine and a tiny
Llama) whose every model step lasts three engine timeouts keeps heartbeating from its step
thread, so it is never declared lost and every request gets its result; a step that runs past
``max_step_s`` is a hang, and the replica is declared lost."""

from __future__ import annotations

import threading
import time

from conftest import Peer, elastic_coordinator, query_stats, stop, wait_stats

from megatron_coord.engine import InferenceEngine
from megatron_coord.engine.server import EngineServer
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


def _serve(model, coordinator_address: str, max_step_s: float):
    engine = InferenceEngine(model, max_batch_size=4, max_seq_len=64)
    _slow_steps(engine)
    server = EngineServer(
        engine,
        single_process_state(),
        coordinator_address,
        idle_timeout_s=0.05,
        heartbeat_interval_s=0.1,
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
