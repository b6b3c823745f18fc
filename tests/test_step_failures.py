"""A failing model step fails its batch's requests, not the replica (engine/step_guard.py).

In-process: the engine reset after a failed step, the out-of-memory policy, the health count;
then an EngineServer against a real coordinator: K failed steps in a row make it unhealthy,
the coordinator routes around it, and a successful probe step brings it back.
"""

from __future__ import annotations

import threading

import pytest
from conftest import Peer, elastic_coordinator, register, wait_stats

from megatron_coord.engine.engine import InferenceEngine
from megatron_coord.engine.server import EngineServer
from megatron_coord.engine.step_guard import StepGuard
from megatron_coord.engine.tp_broadcast import NewRequest
from megatron_coord.parallel_state import single_process_state
from megatron_coord.protocol import Headers
from megatron_coord.sampling_params import SamplingParams
from megatron_coord.testing.step_faults import StepFaults

# termination_id -1 never matches: every request generates its whole budget.
GREEDY = {"top_k": 1, "num_tokens_to_generate": 5, "termination_id": -1}
SAMPLED = {"temperature": 0.9, "num_tokens_to_generate": 5, "termination_id": -1}
MAGIC = 7  # prompts starting with this token fail (StepFaults(token=MAGIC))


def request(request_id: int, prompt: list[int], seed: int = 0, **params) -> NewRequest:
    return NewRequest(request_id, prompt, SamplingParams(**(params or GREEDY)), seed)


def drain(guard: StepGuard) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Step until the engine is idle: generated tokens and failure messages by request id."""
    done, failed = {}, {}
    for _ in range(100):
        if not guard.engine.has_work:
            return done, failed
        outcome = guard.step()
        failed.update(outcome.failed)
        for record in outcome.result.finished:
            r = record["requests"][0]
            done[r["request_id"]] = r["generated_tokens"]
    raise AssertionError("the engine never went idle")


def fresh_tokens(model, new: NewRequest) -> list[int]:
    """What an untouched engine generates for ``new``."""
    guard = StepGuard(
        InferenceEngine(model, max_batch_size=4, max_seq_len=32), single_process_state()
    )
    guard.engine.add_request(new)
    return drain(guard)[0][new.request_id]


def guarded(model, batch: int, faults: StepFaults, max_failures: int = 3) -> StepGuard:
    engine = InferenceEngine(model, max_batch_size=batch, max_seq_len=32)
    faults.install(engine)
    return StepGuard(engine, single_process_state(), max_failures)


def test_failed_step_fails_its_batch_frees_the_slots_and_serves_on(model):
    guard = guarded(model, 2, StepFaults(steps={2}))
    engine = guard.engine
    for rid, prompt in ((1, [10, 20, 30]), (2, [11, 21]), (3, [12, 22, 32])):
        engine.add_request(request(rid, prompt))
    assert not guard.step().failed  # step 1: 1 and 2 prefill; 3 waits for a slot
    outcome = guard.step()  # step 2 raises in sampling
    assert sorted(rid for rid, _ in outcome.failed) == [1, 2]
    for _, message in outcome.failed:
        assert "RuntimeError: injected fault at step 2 on TP rank 0 (global rank 0)" in message
    assert outcome.result.finished == [] and outcome.result.partial == []
    assert outcome.error == "RuntimeError: injected fault at step 2 on TP rank 0 (global rank 0)"
    assert sorted(engine.free_slots) == [0, 1] and not engine.active
    assert [r.request_id for r in engine.waiting] == [3]  # not in the batch: untouched
    assert guard.consecutive_failures == 1 and guard.healthy
    # The replica serves on, id 1 may be reused, and outputs are a fresh engine's.
    again = request(1, [13, 23, 33, 43])
    engine.add_request(again)
    done, failed = drain(guard)
    assert not failed and guard.consecutive_failures == 0
    assert done[1] == fresh_tokens(model, again)
    assert done[3] == fresh_tokens(model, request(3, [12, 22, 32]))
    assert sorted(engine.free_slots) == [0, 1]


def test_abort_records_survive_a_failed_step(model):
    guard = guarded(model, 2, StepFaults(steps={2}))
    guard.engine.add_request(request(1, [10, 20]))
    guard.engine.add_request(request(2, [11, 21]))
    guard.step()
    guard.engine.abort(2)  # its ABORTED record leaves with the next step, failed or not
    outcome = guard.step()
    assert [rid for rid, _ in outcome.failed] == [1]
    assert [r["requests"][0]["status"] for r in outcome.result.finished] == ["ABORTED"]


def test_out_of_memory_fails_the_largest_and_reruns_the_rest(model):
    guard = guarded(model, 3, StepFaults(steps={1}, kind="oom"))
    small = request(1, [10, 20, 30])
    big = request(2, [11, 21, 31, 41, 51])  # the largest KV footprint: prompt + budget
    sampled = request(3, [12, 22], seed=1234, **SAMPLED)
    for new in (small, big, sampled):
        guard.engine.add_request(new)
    outcome = guard.step()
    assert [rid for rid, _ in outcome.failed] == [2]
    message = outcome.failed[0][1]
    assert "out of memory" in message and "OutOfMemoryError" in message and "largest" in message
    assert [r.request_id for r in guard.engine.waiting] == [1, 3]  # in order, at the head
    assert not guard.engine.active and len(guard.engine.free_slots) == 3
    done, failed = drain(guard)
    assert not failed
    # Started over with the same seed: exactly what they would have generated.
    assert done[1] == fresh_tokens(model, small)
    assert done[3] == fresh_tokens(model, sampled)


def test_out_of_memory_fails_requests_that_already_streamed(model):
    guard = guarded(model, 3, StepFaults(steps={2}, kind="oom"))
    streaming = request(1, [10, 20], streaming_interval=1, **GREEDY)
    guard.engine.add_request(streaming)
    guard.engine.add_request(request(2, [11, 21, 31, 41]))
    guard.engine.add_request(request(3, [12, 22]))
    assert guard.step().result.partial  # step 1: request 1 streamed its first token
    outcome = guard.step()
    failed = dict(outcome.failed)
    assert sorted(failed) == [1, 2]
    assert "largest" in failed[2] and "streamed" in failed[1]
    assert [r.request_id for r in guard.engine.waiting] == [3]


def test_health_after_consecutive_failures_and_back(model):
    guard = guarded(model, 2, StepFaults(token=MAGIC), max_failures=2)
    engine = guard.engine
    engine.add_request(request(1, [MAGIC, 1]))
    guard.step()
    assert guard.healthy and guard.consecutive_failures == 1
    engine.add_request(request(2, [MAGIC, 2]))
    guard.step()
    assert not guard.healthy and guard.failed_steps == 2
    engine.add_request(request(3, [5, 6]))
    assert not guard.step().failed
    assert guard.healthy and guard.consecutive_failures == 0 and guard.failed_steps == 2


def test_zero_max_failures_never_unhealthy(model):
    guard = guarded(model, 1, StepFaults(token=MAGIC), max_failures=0)
    for rid in range(1, 5):
        guard.engine.add_request(request(rid, [MAGIC]))
        assert guard.step().failed
    assert guard.healthy and guard.consecutive_failures == 4
    with pytest.raises(ValueError):
        StepGuard(guard.engine, single_process_state(), -1)


# ---------------------------------------------------------------- against a coordinator


def submit(client, client_request_id: int, prompt: list[int]) -> None:
    client.send(int(Headers.SUBMIT_REQUEST), client_request_id, prompt, GREEDY)


def answer(client, client_request_id: int) -> list:
    """The next reply or error for ``client_request_id`` (other messages skipped)."""
    while True:
        message = client.recv()
        if message[0] in (Headers.ENGINE_REPLY, Headers.ERROR) and message[1] == client_request_id:
            return message


def answers_for(client, ids: set[int]) -> dict[int, list]:
    """The reply or error of each client request id in ``ids``."""
    found: dict[int, list] = {}
    while set(found) != ids:
        message = client.recv()
        if message[0] in (Headers.ENGINE_REPLY, Headers.ERROR) and message[1] in ids:
            found[message[1]] = message
    return found


def test_unhealthy_replica_gets_no_new_requests_until_a_probe_succeeds(model, tokenizer):
    coord, client = elastic_coordinator(tokenizer=tokenizer)
    engine = InferenceEngine(model, max_batch_size=2, max_seq_len=32)
    StepFaults(token=MAGIC).install(engine)
    server = EngineServer(
        engine,
        single_process_state(),
        coord.address,
        idle_timeout_s=0.02,
        heartbeat_interval_s=0.05,
        max_step_failures=2,
        probe_interval_s=3600.0,  # the test triggers the probe itself
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    raw = None
    observer = Peer(coord.address).connect_ours()  # STATS here: client replies stay queued
    try:
        wait_stats(observer, lambda s: len(s["engines"]) == 1, "the replica registered")
        for n in (1, 2):  # two failed steps in a row: unhealthy
            submit(client, n, [MAGIC, n])
            error = answer(client, n)
            assert error[:3] == [Headers.ERROR, n, "engine_failed"], error
            assert "RuntimeError: injected fault" in error[3] and "TP rank 0" in error[3]
        wait_stats(
            observer,
            lambda s: replica_load(s).get("healthy") is False,
            "the replica reported itself unhealthy",
        )
        # Nothing new is routed to it: refused (no_engine) or held until an engine can take it.
        submit(client, 3, [5, 3])
        raw = register(coord.address, 1)
        wait_stats(observer, lambda s: len(s["engines"]) == 2, "the raw engine joined")
        for n in (4, 5, 6):
            submit(client, n, [5, n])
        to_raw = set()
        while not {4, 5, 6} <= to_raw:  # a healthy engine joined: it gets every request
            message = raw.recv()
            assert message[0] == Headers.SUBMIT_REQUEST, message
            to_raw.add(message[2][1])
            raw.send(int(Headers.ERROR), message[1], "engine_failed", "raw engine")
        answers = answers_for(client, {3, 4, 5, 6})
        assert answers[3][2] == "no_engine" or 3 in to_raw, answers[3]
        assert all(answers[n][:3] == [Headers.ERROR, n, "engine_failed"] for n in (4, 5, 6))
        assert "raw engine" in answers[4][3]
        assert server.guard.failed_steps == 2 and not server.guard.healthy
        server._next_probe = 0.0  # probe now: token 0 does not fail, so it recovers
        wait_stats(
            observer,
            lambda s: replica_load(s).get("healthy") is True,
            "the replica came back after its probe",
        )
        # Routed to again: of two requests, round robin gives it one, served for real.
        submit(client, 7, [5, 7])
        submit(client, 8, [5, 8])
        message = raw.recv()
        raw.send(int(Headers.ERROR), message[1], "engine_failed", "raw engine")
        replies = {n: answer(client, n) for n in (7, 8) if n != message[2][1]}
        (served,) = replies.values()
        assert served[0] == Headers.ENGINE_REPLY
        assert served[2]["requests"][0]["generated_tokens"] == fresh_tokens(
            model, request(9, served[2]["requests"][0]["prompt_tokens"])
        )
    finally:
        try:
            client.send(int(Headers.STOP))
            if raw is not None:
                while raw.recv() != [Headers.STOP]:
                    pass
                raw.send(int(Headers.STOP_ACK))
            while client.recv() != [Headers.STOP_ACK]:
                pass
            coord.join()
        finally:
            server.request_shutdown()
            thread.join(10)
            server.close()
            if raw is not None:
                raw.close()
            observer.close()
            client.close()
    assert not thread.is_alive()


def replica_load(stats: dict) -> dict:
    """The load report of the replica under test (dp rank 0; the raw engine sends none)."""
    (engine,) = [e for e in stats["engines"] if e["data_parallel_rank"] == 0]
    return engine["load"] or {}
