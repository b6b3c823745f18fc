"""A replica taken for dead gets its requests back (issue 22), with real processes: stepped fake
engines (testing/fake_engine.py) with default settings against a coordinator whose engine
timeout is 0.5 s, one of them SIGSTOPped for twice that with requests in flight (streams among
them), then SIGCONTed, while the failover wait still runs and after it ran out, alone and
beside another replica. Every request gets exactly one final answer, no stream repeats or
misses a token, the replica serves afterwards, and STATS shows the loss and the return.

Also: the liveness contract at registration (REGISTER_ACK, a refusal naming both settings,
Megatron's engines untouched), and a resubmission whose send fails (its engine gone, its
disconnect not yet seen) failing over again instead of failing the request.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq
from conftest import Peer, elastic_coordinator, query_stats, stop, wait_stats

from megatron_coord.testing.fake_engine import spawn
from megatron_coord.testing.fake_model import echo

ENGINE_TIMEOUT_S = 0.5
FREEZE_S = 2 * ENGINE_TIMEOUT_S
TOKENS = 40
STEP = (0.03, 0.0)  # 30 ms a step: TOKENS steps take ~1.2 s, longer than the freeze's start


def _prompt(i: int) -> list[int]:
    return [(i * 7 + k) % 200 + 1 for k in range(3 + i % 4)]


class Collector:
    """Every answer per client request id: partial tokens, and final replies / errors."""

    def __init__(self, client: Peer) -> None:
        self.client = client
        self.partials: dict[int, list[int]] = {}
        self.finals: dict[int, list[list]] = {}

    def submit(self, request_id: int, stream: bool) -> None:
        params = {"num_tokens_to_generate": TOKENS, "streaming_interval": 1 if stream else 0}
        self.client.send(3, request_id, _prompt(request_id), params)
        self.finals[request_id] = []
        if stream:
            self.partials[request_id] = []

    def take(self, timeout_s: float = 30.0) -> None:
        if not self.client.poll(int(timeout_s * 1000)):
            raise AssertionError(f"no answer within {timeout_s} s: {self.unanswered()}")
        message = self.client.recv()
        if message[0] == 103:
            self.partials[message[1]] += message[2]
        elif message[0] in (4, 100):
            self.finals[message[1]].append(message)
        # STATS and the rest: not ours

    def unanswered(self) -> list[int]:
        return [rid for rid, answers in self.finals.items() if not answers]

    def until_answered(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.unanswered():
            self.take(max(0.1, deadline - time.monotonic()))

    def check(self, allowed_errors: set[str]) -> dict[str, int]:
        """Exactly one final answer each; results are the fake's echo, streams saw each token
        once and in order; returns the count of each outcome."""
        outcomes: dict[str, int] = {}
        for request_id, answers in self.finals.items():
            assert len(answers) == 1, (request_id, answers)
            (answer,) = answers
            streamed = self.partials.get(request_id, [])
            if answer[0] == 100:
                assert answer[2] in allowed_errors, answer
                outcomes[answer[2]] = outcomes.get(answer[2], 0) + 1
                assert streamed == echo(_prompt(request_id), TOKENS)[: len(streamed)]
                continue
            tokens = answer[2]["requests"][0]["generated_tokens"]
            assert tokens == echo(_prompt(request_id), TOKENS), (request_id, tokens)
            assert streamed == tokens[: len(streamed)], (request_id, streamed)  # no repeats
            if request_id in self.partials:  # and none missed: all but the last (the record's)
                assert len(streamed) == TOKENS - 1, (request_id, streamed)
            outcomes["result"] = outcomes.get("result", 0) + 1
        return outcomes


def _freeze(pids: list[int], seconds: float) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize(
    ("replicas", "frozen", "failover_wait"),
    [(1, 1, 10.0), (1, 1, 0.3), (2, 1, 10.0), (2, 1, 0.3), (2, 2, 10.0)],
    ids=[
        "alone-wait-runs",
        "alone-wait-ran-out",
        "beside-another-wait-runs",
        "beside-another-wait-ran-out",
        "both-frozen-wait-runs",
    ],
)
def test_a_replica_frozen_twice_the_timeout_gets_its_requests_back(replicas, frozen, failover_wait):
    coord, client = elastic_coordinator(
        engine_timeout=ENGINE_TIMEOUT_S, failover_wait=failover_wait
    )
    observer = Peer(coord.address).connect_ours()
    engines = [
        spawn(coord.address, rank, step_time=STEP, max_batch_size=64) for rank in range(replicas)
    ]
    try:
        stats = wait_stats(observer, lambda s: len(s["engines"]) == replicas, "replicas joined")
        cadence = stats["engines"][0]["info"]["heartbeat_interval"]
        assert cadence == 1.0  # its default, which REGISTER_ACK turned into 0.125 s
        collector = Collector(client)
        for i in range(12):
            collector.submit(i, stream=i % 3 == 0)
        stats = wait_stats(observer, lambda s: s["requests_in_flight"] == 12, "all routed")
        assert stats["engines"][0]["outstanding_requests"] > 0
        while not any(collector.partials.values()):  # streams are under way
            collector.take()
        _freeze([engine.pid for engine in engines[:frozen]], FREEZE_S)
        collector.until_answered()
        if failover_wait > FREEZE_S:  # it came back in time: nothing failed
            outcomes = collector.check(allowed_errors=set())
        else:  # what waited for it in vain failed; nothing else, and nothing twice
            outcomes = collector.check(allowed_errors={"no_engine", "engine_failed"})
            if replicas == 2:  # only streams wait for their own replica
                assert set(outcomes) - {"result"} <= {"engine_failed"}
        assert not client.poll(300)  # nothing late, nothing twice
        stats = wait_stats(
            observer,
            lambda s: len(s["engines"]) == replicas and s["engines_rejoined"] == frozen,
            "the frozen replicas came back",
        )
        assert stats["engines_lost"] == frozen
        if frozen == replicas and failover_wait > FREEZE_S:
            # Each got back what it held: the first back got none of the other's backlog,
            # which waited for its own replica (else the other's holds were dropped there).
            assert stats["requests_adopted"] == 12
        # They serve afterwards (with two, round robin reaches both).
        after = Collector(client)
        for i in range(100, 104):
            after.submit(i, stream=i % 2 == 0)
        after.until_answered()
        assert after.check(allowed_errors=set()) == {"result": 4}
        stats = query_stats(observer)
        assert stats["requests_in_flight"] == 0
        assert all(n == 0 for k, n in stats["maps"].items() if k != "peer_fds")
        assert all(e["load"]["steps"] > 0 for e in stats["engines"])
        stop(coord, client)
        for engine in engines:
            assert engine.wait(30) == 0
    finally:
        observer.close()
        for engine in engines:
            if engine.poll() is None:
                os.kill(engine.pid, signal.SIGCONT)
                engine.kill()
            engine.wait()


# ---- the liveness contract at registration -------------------------------------------------


def _engine(address: str, identity: bytes, rank: int, **liveness) -> Peer:
    """A raw engine of ours that registered (with liveness settings, if given)."""
    engine = Peer(address, identity=identity)
    engine.send(101, {"data_parallel_rank": rank, "protocol": 1, **liveness})
    return engine


def test_registration_answers_the_cadence_and_refuses_a_forced_slower_one():
    coord, client = elastic_coordinator(engine_timeout=ENGINE_TIMEOUT_S)
    follows = _engine(coord.address, b"follows", 0, heartbeat_interval=1.0)
    ack = follows.recv()
    assert ack[0] == 110 and ack[1]["heartbeat_interval"] == ENGINE_TIMEOUT_S / 4
    assert ack[1]["engine_timeout"] == ENGINE_TIMEOUT_S and ack[1]["drop"] == []
    fast = _engine(coord.address, b"fast", 1, heartbeat_interval=0.1, heartbeat_interval_fixed=True)
    assert fast.recv()[1]["heartbeat_interval"] == 0.1  # its own, forced and fast enough
    slow = _engine(coord.address, b"slow", 2, heartbeat_interval=1.0, heartbeat_interval_fixed=True)
    refusal = slow.recv()
    assert refusal[0] == 110 and refusal[1]["engine_timeout"] == ENGINE_TIMEOUT_S
    why = refusal[1]["refused"]
    assert (
        "every 1 s (--heartbeat-interval)" in why and "0.5 s" in why and "--engine-timeout" in why
    )
    older = _engine(coord.address, b"older", 3)  # says no interval: no new message, as Megatron's
    megatron = Peer(coord.address, identity=b"mp-coord-4")
    megatron.send_raw(b"")
    stats = wait_stats(client, lambda s: len(s["engines"]) == 4, "four engines registered")
    assert b"slow".hex() not in {e["identity"] for e in stats["engines"]}
    assert not older.poll(200) and not megatron.poll(0)
    client.send(1, {"protocol": 1, "heartbeat_interval": 2.0, "coordinator_timeout": 3.0})
    assert client.recv() == [2, {"heartbeat_interval": 1.0}]  # a third of its own timeout
    client.send(10)  # STOP: every engine acks
    for engine in (follows, fast, older, megatron):
        assert engine.recv() == [10]
        engine.send(11)
    assert client.recv() == [11]
    coord.join()
    for peer in (follows, fast, slow, older, megatron):
        peer.close()


# ---- a resubmission whose send fails ---------------------------------------------------------


def _failing_sends_to(coord, identity: bytes) -> None:
    """Sends of resubmissions to ``identity`` fail, as when its connection is gone but its
    disconnect is not processed yet (the outbox's answer for a peer the ROUTER lost)."""
    outbox = coord.coordinator.outbox
    real = outbox.send_submit
    outbox.send_submit = lambda engine, frame: engine != identity and real(engine, frame)


def test_a_resubmission_whose_send_fails_fails_over_again():
    coord, client = elastic_coordinator(failover_wait=30.0)
    first = _engine(coord.address, b"engine-a", 0)
    second = _engine(coord.address, b"engine-b", 1)
    wait_stats(client, lambda s: len(s["engines"]) == 2, "engines joined")
    client.send(3, "r", [65, 66], {"num_tokens_to_generate": 1})
    holder, other = (first, second) if first.poll(5000) else (second, first)
    submit = holder.recv()
    _failing_sends_to(coord, other.sock.getsockopt(zmq.IDENTITY))
    holder.close()  # its requests go to the other engine, whose send fails: it is gone too
    stats = wait_stats(client, lambda s: s["engines_lost"] == 2, "both engines lost")
    assert stats["engines"] == [] and stats["maps"]["orphans"] == 1
    assert not client.poll(200)  # not failed: it waits for an engine, as any orphan does
    third = _engine(coord.address, b"engine-c", 2)
    resent = third.recv()
    assert resent == submit
    record = {"request_id": resent[1], "prompt_tokens": [65, 66], "generated_tokens": [67]}
    third.send(4, [{"requests": [record]}])
    reply = client.recv()
    assert reply[:2] == [4, "r"] and reply[2]["requests"][0]["generated_text"] == "C"
    assert not client.poll(200)  # exactly one outcome
    third.close()
    other.close()
    wait_stats(client, lambda s: not s["engines"], "engine left")
    stop(coord, client)


def test_a_resubmission_whose_send_fails_in_a_shutdown_is_shutting_down():
    coord, client = elastic_coordinator(failover_wait=30.0, shutdown_grace=30.0)
    first = _engine(coord.address, b"engine-a", 0)
    wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
    client.send(3, "r", [65, 66], {"num_tokens_to_generate": 1})
    assert first.recv()[0] == 3
    first.close()
    wait_stats(client, lambda s: s["maps"]["orphans"] == 1, "the request waits")
    coord.coordinator.request_shutdown()
    wait_stats(client, lambda s: s["shutting_down"], "shutting down (the grace runs)")
    _failing_sends_to(coord, b"engine-c")
    late = _engine(coord.address, b"engine-c", 1)  # adopts the orphan; its send fails
    message = client.recv()
    while message[0] != 100:
        message = client.recv()
    assert message[:3] == [100, "r", "shutting_down"], message
    coord.join()  # nothing left in flight: the shutdown ends
    late.close()


def test_a_request_fails_over_at_most_three_times():
    """Calm under flapping: a request whose engines keep dying is not bounced forever."""
    coord, client = elastic_coordinator(failover_wait=30.0)
    engines = [_engine(coord.address, b"engine-0", 0)]
    wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
    client.send(3, "r", [65], {"num_tokens_to_generate": 1})
    for n in range(1, 5):
        holder = engines[-1]
        assert holder.recv()[0] == 3  # it holds the request now
        engines.append(_engine(coord.address, b"engine-%d" % n, n))
        wait_stats(
            client, lambda s, n=n: s["engines_lost"] == n - 1 and len(s["engines"]) == 2, "joined"
        )
        holder.close()  # the request moves to the newcomer (failover n), or fails at the 4th
    error = client.recv()
    assert error[:3] == [100, "r", "engine_failed"] and "lost 4 times" in error[3], error
    stats = wait_stats(client, lambda s: s["engines_lost"] == 4, "four engines lost")
    assert stats["requests_resubmitted"] == 3 and stats["requests_in_flight"] == 0
    assert not engines[-1].poll(200)  # the fourth newcomer never got it
    engines[-1].close()
    wait_stats(client, lambda s: not s["engines"], "engine left")
    stop(coord, client)
