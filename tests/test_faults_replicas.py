"""kill -9 of a real replica mid-load: two replicas as separate torchrun jobs joined to a
standalone coordinator (python -m megatron_coord.coordinator), a tiny Llama, gloo on CPU.

Every request gets exactly one answer (the killed replica's were resent to the survivor: none
of them had streamed), the survivor serves new requests, a restarted replica registers and gets
traffic, a client STOP ends every process cleanly, and the coordinator's maps end empty.
"""

from __future__ import annotations

import os
import signal
import time

import msgspec
import pytest
import zmq
from _procs import ServeLaunch, free_port

from megatron_coord.testing.fault_harness import (
    ReplicaJob,
    StandaloneCoordinator,
    StatsProbe,
    processes_with,
)

pytestmark = pytest.mark.torchrun

ENGINE_TIMEOUT_S = 1.5
N_REQUESTS = 160
N_TOKENS = 24
# The resent requests still have to be computed by the survivor after the death is noticed;
# this bound is generous for a loaded 2-core machine (the benchmark reports the real time).
ANSWER_MARGIN_S = 90.0


class RawClient:
    """A DEALER speaking our protocol that counts every reply per request id."""

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.send([1, {"protocol": 1}])
        assert self.recv(30.0) == [2]
        self.answers: dict[int, list[list]] = {}

    def send(self, message: list) -> None:
        self.sock.send(msgspec.msgpack.encode(message))

    def recv(self, timeout: float) -> list | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return msgspec.msgpack.decode(self.sock.recv())

    def submit(self, request_id: int, prompt: list[int]) -> None:
        params = {"num_tokens_to_generate": N_TOKENS, "top_k": 1}
        self.send([3, request_id, prompt, params])
        self.answers[request_id] = []

    def collect(self, timeout: float) -> None:
        """Receive one message (ENGINE_REPLY or ERROR) and file it under its request id."""
        message = self.recv(timeout)
        assert message is not None, f"no answer within {timeout} s"
        assert message[0] in (4, 100), message
        self.answers[message[1]].append(message)

    def unanswered(self) -> int:
        return sum(1 for replies in self.answers.values() if not replies)

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()


def _prompt(i: int) -> list[int]:
    return [(i * 7 + k) % 200 + 1 for k in range(4 + i % 5)]


def test_kill9_replica_mid_load(checkpoint):
    coordinator = StandaloneCoordinator(checkpoint, "--engine-timeout", str(ENGINE_TIMEOUT_S))
    jobs: list[ReplicaJob] = []
    probe = client = None
    try:
        probe = StatsProbe(coordinator.address)
        replica_args = ("--max-batch-size", "4", "--coordinator-timeout", "30")
        jobs = [ReplicaJob(coordinator.address, checkpoint, *replica_args) for _ in range(2)]
        stats = probe.wait_for(lambda s: len(s["engines"]) == 2, 180, "two replicas registered")
        victim = stats["engines"][0]
        victim_pid = victim["info"]["pid"]
        (victim_job,) = [job for job in jobs if victim_pid in processes_with(job.marker)]
        (survivor_job,) = [job for job in jobs if job is not victim_job]
        survivor_identity = stats["engines"][1]["identity"]
        assert stats["engines"][0]["identity"] != survivor_identity

        client = RawClient(coordinator.address)
        for i in range(N_REQUESTS):
            client.submit(i, _prompt(i))
        for _ in range(8):  # the load runs on both replicas
            client.collect(120.0)
        before = probe.stats()
        victim_load = [e for e in before["engines"] if e["identity"] == victim["identity"]]
        assert victim_load and victim_load[0]["outstanding_requests"] > 0
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while client.unanswered():
            client.collect(ENGINE_TIMEOUT_S + ANSWER_MARGIN_S)
        last_answer_s = time.monotonic() - killed_at
        assert last_answer_s < ENGINE_TIMEOUT_S + ANSWER_MARGIN_S
        assert client.recv(0.5) is None  # nothing more: no request answered twice

        # Exactly one answer each, and a result, not an error: nothing had streamed, so the
        # killed replica's requests were resent to the survivor.
        for request_id, replies in client.answers.items():
            assert len(replies) == 1, (request_id, replies)
            assert replies[0][0] == 4, replies[0]
            assert len(replies[0][2]["requests"][0]["generated_tokens"]) == N_TOKENS
        after = probe.stats()
        assert after["engines_lost"] == 1
        assert after["requests_resubmitted"] > 0
        assert [e["identity"] for e in after["engines"]] == [survivor_identity]
        assert victim_job.wait(60) != 0  # torchrun reports its killed rank

        # The survivor serves new requests.
        for i in range(N_REQUESTS, N_REQUESTS + 6):
            client.submit(i, _prompt(i))
        for _ in range(6):
            client.collect(120.0)
        assert client.unanswered() == 0

        # A restarted replica registers and gets traffic.
        jobs.append(ReplicaJob(coordinator.address, checkpoint, *replica_args))
        stats = probe.wait_for(lambda s: len(s["engines"]) == 2, 180, "the replica came back")
        (new,) = [e for e in stats["engines"] if e["identity"] != survivor_identity]
        for i in range(N_REQUESTS + 6, N_REQUESTS + 30):
            client.submit(i, _prompt(i))
        for _ in range(24):
            client.collect(120.0)
        assert all(len(r) == 1 and r[0][0] == 4 for r in client.answers.values())
        probe.wait_for(
            lambda s: any(
                e["identity"] == new["identity"] and (e["load"] or {}).get("generated_tokens", 0)
                for e in s["engines"]
            ),
            30,
            "the restarted replica generated tokens",
        )
        final = probe.stats()
        assert final["requests_in_flight"] == 0
        assert {k: v for k, v in final["maps"].items() if k != "peer_fds"} == dict.fromkeys(
            final["maps"].keys() - {"peer_fds"}, 0
        )

        # STOP ends the live replicas and the coordinator, all with status 0.
        client.send([10])
        message = client.recv(60.0)
        while message is not None and message[0] != 11:
            message = client.recv(60.0)
        assert message == [11]
        assert coordinator.wait(60) == 0
        assert survivor_job.wait(60) == 0
        assert jobs[2].wait(60) == 0
        for job in jobs:
            assert processes_with(job.marker) == []
    finally:
        for closable in (client, probe):
            if closable is not None:
                closable.close()
        for job in jobs:
            job.kill()
        coordinator.kill()


def test_a_default_replica_keeps_a_short_engine_timeout_a_forced_slow_one_is_refused(
    checkpoint, tmp_path
):
    """Issue 22: a coordinator with --engine-timeout 0.5 (half a replica's default heartbeat
    interval) and a replica with its defaults whose steps last three times that: REGISTER_ACK
    gives the replica the cadence to keep, so it is never lost and every request is answered.
    A replica whose --heartbeat-interval 1 is forced cannot keep that timeout: it is refused
    and exits with a configuration error naming both settings."""
    coordinator = StandaloneCoordinator(checkpoint, "--engine-timeout", "0.5")
    slow_steps = {
        "MEGATRON_COORD_STEP_HOOK": "megatron_coord.testing.step_faults:from_env",
        "MEGATRON_COORD_FAULT_SLEEP_S": "1.5",
    }
    jobs: list[ReplicaJob] = []
    probe = client = None
    try:
        probe = StatsProbe(coordinator.address)
        jobs.append(ReplicaJob(coordinator.address, checkpoint, env=slow_steps))
        log = str(tmp_path / "forced.log")
        forced = ReplicaJob(coordinator.address, checkpoint, "--heartbeat-interval", "1",
                            log_path=log)  # fmt: skip
        jobs.append(forced)
        stats = probe.wait_for(lambda s: len(s["engines"]) == 1, 180, "the replica registered")
        assert stats["engines"][0]["info"]["heartbeat_interval"] == 1.0  # its default...
        assert stats["engines"][0]["info"]["heartbeat_interval_fixed"] is False  # ...not forced
        client = RawClient(coordinator.address)
        for i in range(4):  # two steps of 1.5 s each: three engine timeouts apiece
            client.send([3, i, _prompt(i), {"num_tokens_to_generate": 2, "top_k": 1}])
            client.answers[i] = []
        while client.unanswered():
            client.collect(120.0)
        assert all(len(r) == 1 and r[0][0] == 4 for r in client.answers.values()), client.answers
        stats = probe.stats()
        assert stats["engines_lost"] == 0 and stats["requests_resubmitted"] == 0
        assert forced.wait(120) != 0  # torchrun reports the worker's exit code 2
        text = forced.log()
        assert "refused this replica" in text and "exitcode" in text and ": 2" in text
        assert "--heartbeat-interval" in text and "--engine-timeout" in text
        assert "joined" not in text
        assert len(probe.stats()["engines"]) == 1
        client.send([10])  # STOP ends the replica and the coordinator
        message = client.recv(60.0)
        while message is not None and message != [11]:
            message = client.recv(60.0)
        assert message == [11]
        assert coordinator.wait(60) == 0
        assert jobs[0].wait(60) == 0
    finally:
        for closable in (client, probe):
            if closable is not None:
                closable.close()
        for job in jobs:
            job.kill()
        coordinator.kill()


def test_joined_replica_that_loses_the_coordinator_says_so_and_exits(checkpoint, tmp_path):
    coordinator = StandaloneCoordinator(checkpoint)
    log = str(tmp_path / "replica.log")
    job = None
    try:
        probe = StatsProbe(coordinator.address)
        job = ReplicaJob(coordinator.address, checkpoint, "--coordinator-timeout", "2",
                         "--no-coordinator-reconnect", log_path=log)  # fmt: skip
        probe.wait_for(lambda s: len(s["engines"]) == 1, 180, "replica registered")
        probe.close()
        deadline = time.monotonic() + 30  # answered (a heartbeat), so it counts as joined
        while "replica 0 joined" not in job.log():
            assert time.monotonic() < deadline, job.log()
            time.sleep(0.1)
        coordinator.process.kill()  # kill -9: no goodbye to anyone
        coordinator.process.wait()
        assert job.wait(60) != 0
        assert "lost the coordinator" in job.log()
        assert processes_with(job.marker) == []
    finally:
        if job is not None:
            job.kill()
        coordinator.kill()


def test_sigterm_to_a_launch_answers_every_in_flight_request(checkpoint, tmp_path):
    """A launch with its own coordinator: SIGTERM mid-load ends every process, and every
    request in flight gets an answer (its result, or an error saying why), none hangs. The
    grace is short, so the drain (test_launch_lifetime.py) leaves requests to fail."""
    server = ServeLaunch(
        tmp_path, checkpoint, 2, 1, "--max-batch-size", "2", "--shutdown-grace", "0.2"
    )
    client = None
    try:
        client = RawClient(server.address)
        for i in range(40):
            client.submit(i, _prompt(i))
        client.collect(120.0)  # the load is running
        server.proc.send_signal(signal.SIGTERM)
        while client.unanswered():
            client.collect(60.0)
        errors = [r[0] for r in client.answers.values() if r[0][0] == 100]
        assert errors, "SIGTERM came after the whole load finished"
        assert {e[2] for e in errors} <= {"no_engine", "shutting_down", "engine_failed"}
        assert all(len(r) == 1 for r in client.answers.values())
        server.wait()  # torchrun reports the signal its way; what matters is that all exit
        assert processes_with(server.marker) == []
    finally:
        if client is not None:
            client.close()
        server.kill()


def test_auth_keys_let_a_replica_in_and_keep_a_keyless_one_out(checkpoint, tmp_path):
    import asyncio

    from megatron_coord import InferenceClient, SamplingParams
    from megatron_coord.auth import generate

    keys = str(tmp_path / "keys")
    generate(keys)
    coordinator = StandaloneCoordinator(checkpoint, "--auth-keys", keys)
    jobs: list[ReplicaJob] = []
    probe = None
    try:
        probe = StatsProbe(coordinator.address, auth_keys=keys)
        jobs.append(ReplicaJob(coordinator.address, checkpoint, "--auth-keys", keys))
        log = str(tmp_path / "keyless.log")
        keyless = ReplicaJob(coordinator.address, checkpoint, "--join-timeout", "3",
                             log_path=log)  # fmt: skip
        jobs.append(keyless)
        probe.wait_for(lambda s: len(s["engines"]) == 1, 180, "keyed replica registered")
        assert keyless.wait(120) != 0  # never heard back: it gives up
        assert "could not reach the coordinator" in keyless.log()
        assert "joined" not in keyless.log()
        assert len(probe.stats()["engines"]) == 1

        async def one_request() -> str:
            client = InferenceClient(coordinator.address, auth_keys=keys)
            await client.start()
            try:
                params = SamplingParams(num_tokens_to_generate=3, top_k=1)
                record = await asyncio.wait_for(client.add_request([5, 6, 7], params), 60)
                await client.stop_engines()
                return record["requests"][0]["generated_tokens"]
            finally:
                client.stop()

        assert len(asyncio.run(one_request())) == 3
        assert coordinator.wait(60) == 0
        assert jobs[0].wait(60) == 0
    finally:
        if probe is not None:
            probe.close()
        for job in jobs:
            job.kill()
        coordinator.kill()


def test_reconnecting_replica_registers_with_a_restarted_coordinator(checkpoint, tmp_path):
    port = free_port()
    first = StandaloneCoordinator(checkpoint, "--port", str(port))
    second = job = probe = client = None
    log = str(tmp_path / "replica.log")
    try:
        probe = StatsProbe(first.address)
        job = ReplicaJob(
            first.address, checkpoint, "--coordinator-timeout", "2", log_path=log
        )  # reconnecting is the default
        probe.wait_for(lambda s: len(s["engines"]) == 1, 180, "replica registered")
        probe.close()
        first.process.kill()
        first.process.wait()
        second = StandaloneCoordinator(checkpoint, "--port", str(port))
        assert second.address == first.address
        probe = StatsProbe(second.address)
        probe.wait_for(lambda s: len(s["engines"]) == 1, 120, "replica registered again")
        assert job.process.poll() is None  # it waited instead of exiting
        client = RawClient(second.address)
        client.submit(0, _prompt(0))
        client.collect(120.0)
        assert client.answers[0][0][0] == 4
        client.send([10])
        message = client.recv(60.0)
        while message is not None and message != [11]:
            message = client.recv(60.0)
        assert message == [11]
        assert second.wait(60) == 0
        assert job.wait(60) == 0
        assert "registering again" in job.log() or "register again" in job.log()
    finally:
        for closable in (client, probe):
            if closable is not None:
                closable.close()
        if job is not None:
            job.kill()
        for coordinator in (first, second):
            if coordinator is not None:
                coordinator.kill()
