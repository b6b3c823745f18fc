"""CURVE authentication (zmq.auth) on loopback: key holders get in, everyone else is refused.

Tests bind 127.0.0.1 only; authentication is switched on explicitly with ``auth_keys``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import msgspec
import pytest
import zmq
from _procs import ROOT
from conftest import ThreadedCoordinator

from megatron_coord import InferenceClient, SamplingParams
from megatron_coord.auth import apply_client, check_bind, generate, is_loopback


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("keys"))
    generate(directory)
    return directory


@pytest.fixture(scope="module")
def rogue_keys(tmp_path_factory, keys) -> str:
    """A client key pair the coordinator never authorized (it knows the real server key)."""
    directory = str(tmp_path_factory.mktemp("rogue"))
    generate(directory)
    shutil.copy(os.path.join(keys, "server.key"), os.path.join(directory, "server.key"))
    return directory


class CurveEngine:
    """A raw engine DEALER with the authorized client key pair."""

    def __init__(self, address: str, keys: str | None) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            apply_client(self.sock, keys)
        self.sock.connect(address)
        self.send([101, {"data_parallel_rank": 0, "protocol": 1}])

    def send(self, message: list) -> None:
        self.sock.send(msgspec.msgpack.encode(message))

    def recv(self, timeout_ms: int = 20000) -> list:
        assert self.sock.poll(timeout_ms), "nothing for the engine"
        return msgspec.msgpack.decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()


async def _client_round(address: str, keys: str | None, engine: CurveEngine | None):
    client = InferenceClient(address, connect_timeout=1.5, auth_keys=keys)
    await client.start()
    try:
        future = client.add_request("hi", SamplingParams(num_tokens_to_generate=1))
        if engine is not None:
            submit = await asyncio.to_thread(engine.recv)
            assert submit[0] == 3 and submit[2] == [104, 105]
            records = [{"requests": [{"request_id": submit[1], "generated_tokens": [33]}]}]
            engine.send([4, records])
        return (await asyncio.wait_for(future, 20))["requests"][0]["generated_text"]
    finally:
        client.stop()


def test_key_holders_get_in_and_everyone_else_is_refused(keys, rogue_keys):
    coord = ThreadedCoordinator(0, auth_keys=keys)
    assert coord.ready.wait(30)
    engine = CurveEngine(coord.address, keys)
    stranger_engine = CurveEngine(coord.address, None)  # no key: its REGISTER never arrives
    rogue_engine = CurveEngine(coord.address, rogue_keys)
    try:
        # The CURVE handshake takes a moment: a request sent before the key holder's REGISTER
        # arrives is (rightly) refused with no_engine.
        deadline = time.monotonic() + 20
        while not coord.coordinator.engines:
            assert time.monotonic() < deadline, "the key holder's engine never registered"
            time.sleep(0.01)
        assert asyncio.run(_client_round(coord.address, keys, engine)) == "!"
        with pytest.raises(TimeoutError, match="no CONNECT_ACK"):
            asyncio.run(_client_round(coord.address, None, None))
        with pytest.raises(TimeoutError, match="no CONNECT_ACK"):
            asyncio.run(_client_round(coord.address, rogue_keys, None))
        assert len(coord.coordinator.engines) == 1  # only the key holder registered
        assert not stranger_engine.sock.poll(100) and not rogue_engine.sock.poll(100)
    finally:
        for peer in (engine, stranger_engine, rogue_engine):
            peer.close()
        coord.coordinator.request_shutdown()
        _wake(coord.address, keys)
        coord.join()


def _wake(address: str, keys: str) -> None:
    """One authorized CONNECT wakes the loop so it notices the shutdown request."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_client(sock, keys)
    sock.connect(address)
    sock.send(msgspec.msgpack.encode([1, {"protocol": 1}]))
    sock.poll(5000)
    sock.close(0)
    context.term()


def test_non_loopback_bind_needs_keys_or_a_loud_opt_out(caplog, keys):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="--auth-keys"):
        check_bind("0.0.0.0", None, False)
    check_bind("0.0.0.0", keys, False)
    check_bind("0.0.0.0", None, True)
    assert "WITHOUT authentication" in caplog.text


def test_standalone_refuses_a_public_bind_without_auth(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_coord.coordinator", "--port", "0", "--host", "0.0.0.0",
         "--tokenizer", "unused"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--insecure-no-auth" in result.stderr


def test_generate_cli_writes_a_key_directory(tmp_path):
    directory = tmp_path / "k"
    subprocess.run(
        [sys.executable, "-m", "megatron_coord.auth", "generate", str(directory)],
        check=True, timeout=60, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    names = sorted(os.listdir(directory))
    assert names == ["authorized", "client.key", "client.key_secret", "server.key",
                     "server.key_secret"]  # fmt: skip
    assert os.listdir(directory / "authorized") == ["client.key"]
    assert os.stat(directory / "server.key_secret").st_mode & 0o077 == 0
