"""The command-line services as an operator meets them, with real processes: a chosen port is a
promise (taken: exit 2 naming its holder; 0: any free port, printed), a replica says it joined
only once the coordinator answered (nothing there: exit 3), requests sent before any replica
registered wait for one, and the HTTP front end tells live from ready."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest
from _procs import free_port, http_get, launch_env, processes_with, torchrun

from megatron_coord import InferenceClient, SamplingParams
from megatron_coord.exit_codes import CONFIG_ERROR, PEER_LOST
from megatron_coord.serving import HTTPServerThread
from megatron_coord.testing.fault_harness import ReplicaJob, StandaloneCoordinator


@pytest.fixture
def held_port():
    """A port some other process (this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _run(command: list[str], tmp_path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = launch_env("operations", tmp_path)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _holder_named(stderr: str, port: int) -> bool:
    line = f"error: cannot bind 127.0.0.1:{port}: the port is held by pid {os.getpid()}"
    return line in stderr


def test_a_taken_port_fails_the_standalone_coordinator(held_port, checkpoint, tmp_path):
    command = [sys.executable, "-m", "megatron_coord.coordinator", "--port", str(held_port)]
    result = _run([*command, "--tokenizer", checkpoint], tmp_path)
    assert result.returncode == CONFIG_ERROR, result.stderr
    assert _holder_named(result.stderr, held_port), result.stderr
    assert "listening" not in result.stdout


def test_a_taken_port_fails_the_http_front_end(held_port, tmp_path):
    command = [sys.executable, "-m", "megatron_coord.serving", "--port", str(held_port)]
    result = _run([*command, "--coordinator-address", "tcp://127.0.0.1:9"], tmp_path)
    assert result.returncode == CONFIG_ERROR, result.stderr
    assert _holder_named(result.stderr, held_port), result.stderr


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
def test_a_taken_port_fails_a_serving_launch(flag, held_port, checkpoint, tmp_path):
    args = ["--model", checkpoint, flag, str(held_port)]
    started = time.monotonic()
    result = _run(torchrun(1, "serve.py", *args), tmp_path)
    assert result.returncode != 0  # torchrun's own code for a failed worker
    assert f"exitcode  : {CONFIG_ERROR}" in result.stderr, result.stderr
    assert _holder_named(result.stderr, held_port), result.stderr
    assert time.monotonic() - started < 120
    assert processes_with(launch_env("operations", tmp_path)["MEGATRON_COORD_TEST_MARKER"]) == []


def test_port_zero_prints_a_reachable_address(checkpoint, tmp_path):
    address_file = tmp_path / "address"
    command = [sys.executable, "-m", "megatron_coord.coordinator", "--port", "0"]
    command += ["--tokenizer", checkpoint, "--address-file", str(address_file)]
    process = subprocess.Popen(
        command, env=launch_env("operations", tmp_path), stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("coordinator listening at tcp://127.0.0.1:"), line
        address = line.rsplit(" ", 1)[1]
        assert not address.endswith(":0")
        assert address_file.read_text() == address

        async def stats() -> dict:
            client = InferenceClient(address)
            await client.start()
            try:
                return await client.stats()
            finally:
                await client.stop_engines()  # no engine: acknowledged at once, it exits
                client.stop()

        assert asyncio.run(stats())["engines"] == []
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait()


def test_a_replica_pointed_at_nothing_never_claims_to_have_joined(checkpoint, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens here
    log = str(tmp_path / "replica.log")
    job = ReplicaJob(address, checkpoint, "--join-timeout", "3", log_path=log)
    try:
        assert job.wait(120) != 0
        text = job.log()
        assert f"replica 0: waiting for the coordinator at {address}" in text
        assert "joined" not in text
        assert f"could not reach the coordinator at {address} within 3 s" in text
        assert f"exitcode  : {PEER_LOST}" in text, text
    finally:
        job.kill()


def test_clients_started_before_their_replicas_are_served(checkpoint, tmp_path):
    """The usual deployment order: coordinator, clients and HTTP first, replicas still
    loading. Requests wait for a replica (within --wait-for-engine), wait_ready() returns once
    one registered, /health/live is 200 throughout and /health/ready 503 until then."""
    coordinator = StandaloneCoordinator(checkpoint, "--wait-for-engine", "120")
    http = HTTPServerThread(coordinator.address).start()
    job = None

    async def scenario() -> tuple[list[dict], dict]:
        nonlocal job
        client = InferenceClient(coordinator.address)
        await client.start()
        try:
            params = SamplingParams(num_tokens_to_generate=4, top_k=1)
            early = [client.add_request([5, 6, 7, i], params) for i in range(3)]
            assert http_get(f"{http.url}/health/live")[0] == 200
            status, body = http_get(f"{http.url}/health/ready")
            assert status == 503 and body["error"]["code"] == "no_engine"
            with pytest.raises(TimeoutError, match="1 engine"):
                await client.wait_ready(min_engines=1, timeout=0.5)
            job = ReplicaJob(coordinator.address, checkpoint, log_path=str(tmp_path / "r.log"))
            stats = await client.wait_ready(min_engines=1, timeout=120)
            records = await asyncio.wait_for(asyncio.gather(*early), 120)
            assert http_get(f"{http.url}/health/ready")[0] == 200
            await client.stop_engines()
            return records, stats
        finally:
            client.stop()

    try:
        records, stats = asyncio.run(scenario())
        assert len(stats["engines"]) == 1
        assert [len(r["requests"][0]["generated_tokens"]) for r in records] == [4, 4, 4]
        assert "replica 0 joined the coordinator" in job.log()
        assert coordinator.wait(60) == 0
        assert job.wait(60) == 0
    finally:
        http.stop()
        if job is not None:
            job.kill()
        coordinator.kill()
