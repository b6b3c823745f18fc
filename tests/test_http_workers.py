"""``--http-workers N``: worker processes sharing one port, each serving, replaced when killed,
with /metrics summed over all of them and the same API-key and health answers in each.

Real processes on 127.0.0.1: a coordinator, fake engines (stepped ones, so a stream takes
seconds), an ``HTTPWorkerPool`` of 2 workers. Which worker holds an HTTP connection is read
from the kernel (/proc/net/tcp and each worker's file descriptors), not from the server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import start_coordinator
from prometheus_client.parser import text_string_to_metric_families

from megatron_coord.serving import HTTPWorkerPool
from megatron_coord.testing.fake_engine import spawn

MODEL = "tiny-echo"
KEY = "sesame"


class WorkerStack:
    """Coordinator + 2 stepped fake engines (20 ms per token) + a pool of 2 HTTP workers."""

    def __init__(self) -> None:
        self.address, self.coordinator, ready = start_coordinator(2)
        self.engines = [spawn(self.address, r, step_time=(0.02, 0.0)) for r in range(2)]
        assert ready.wait(60), "engines did not register"
        self.pool = HTTPWorkerPool(self.address, 2, model_name=MODEL, api_key=KEY).start()

    def close(self) -> None:
        self.pool.stop()
        for engine in self.engines:
            engine.kill()
            engine.wait()
        self.coordinator.kill()
        self.coordinator.join()


@pytest.fixture(scope="module")
def stack() -> Iterator[WorkerStack]:
    s = WorkerStack()
    yield s
    s.close()


def _server_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the loopback TCP connection from ``client_port``."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
                client_port
            ):
                return inode
    return None


def owner(pool: HTTPWorkerPool, conn: socket.socket) -> int | None:
    """The pid of the worker that accepted ``conn`` (after a request was answered on it)."""
    inode = _server_inode(pool.port, conn.getsockname()[1])
    for pid in pool.pids:
        if pid is None or inode is None:
            continue
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def raw_request(conn: socket.socket, method: str, path: str, body: dict | None = None, key=KEY):
    """One HTTP/1.1 keep-alive request on ``conn``; returns (status, body bytes)."""
    data = json.dumps(body).encode() if body is not None else b""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    conn.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    reader = conn.makefile("rb")
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, reader.read(length)


def connections_on_every_worker(pool: HTTPWorkerPool, limit: int = 64) -> dict[int, socket.socket]:
    """Open connections until each worker holds one (SO_REUSEPORT hashes them over both)."""
    held: dict[int, socket.socket] = {}
    spare = []
    for _ in range(limit):
        conn = socket.create_connection(("127.0.0.1", pool.port), timeout=30)
        assert raw_request(conn, "GET", "/health/live")[0] == 200
        pid = owner(pool, conn)
        assert pid in pool.pids
        (spare if pid in held else held.__setitem__(pid, conn) or []).append(conn)
        if len(held) == len(pool.pids):
            break
    for conn in spare:
        conn.close()
    assert len(held) == 2, "the kernel never gave a connection to one of the workers"
    return held


def scrape(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


SUCCESS = ("megatron_coord_requests_total", (("endpoint", "completions"), ("outcome", "success")))


def test_workers_share_the_port_and_all_serve_with_the_same_checks(stack: WorkerStack) -> None:
    pool = stack.pool
    assert len(set(pool.pids)) == 2 and None not in pool.pids
    body = {"model": MODEL, "prompt": "hey", "max_tokens": 3}
    for pid, conn in connections_on_every_worker(pool).items():
        status, text = raw_request(conn, "POST", "/v1/completions", body)
        assert status == 200, text
        assert json.loads(text)["choices"][0]["text"] == "hey"
        assert raw_request(conn, "POST", "/v1/completions", body, key="wrong")[0] == 401
        assert raw_request(conn, "POST", "/v1/completions", body, key=None)[0] == 401
        status, text = raw_request(conn, "GET", "/health")
        assert status == 200 and json.loads(text)["replicas_alive"] == 2
        assert owner(pool, conn) == pid  # still the same worker answering
        conn.close()


def test_metrics_add_up_across_workers(stack: WorkerStack) -> None:
    pool = stack.pool
    before = scrape(pool.url).get(SUCCESS, 0)
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 2}
    per_worker = {}
    for pid, conn in connections_on_every_worker(pool).items():
        count = 3 if not per_worker else 5
        for _ in range(count):
            assert raw_request(conn, "POST", "/v1/completions", body)[0] == 200
        per_worker[pid] = count
        conn.close()
    # Every scrape, whichever worker answers it, counts both workers' requests.
    for _ in range(6):
        m = scrape(pool.url)
        assert m[SUCCESS] - before == 8
        assert m[("megatron_coord_http_requests_running", ())] == 0
        assert m[("megatron_coord_coordinator_up", ())] == 1
        assert m[("megatron_coord_replicas_alive", ())] == 2


def test_a_killed_worker_fails_its_stream_at_once_and_is_replaced(stack: WorkerStack) -> None:
    pool = stack.pool
    counted = scrape(pool.url)[SUCCESS]
    victim, conn = next(iter(connections_on_every_worker(pool).items()))
    slot = pool.pids.index(victim)
    body = {"model": MODEL, "prompt": "xy", "max_tokens": 300, "stream": True}  # ~6 s
    data = json.dumps(body).encode()
    conn.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    got = b""
    while got.count(b"data: {") < 3:  # the stream is under way, incrementally
        chunk = conn.recv(65536)
        assert chunk, "the stream ended early"
        got += chunk
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    conn.settimeout(10)
    try:
        while chunk := conn.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    assert time.monotonic() - killed_at < 3, "the stream hung after its worker died"
    assert b"[DONE]" not in got  # the client sees it cut short, not completed
    conn.close()

    deadline = time.monotonic() + 60
    while pool.restarts == 0:
        assert time.monotonic() < deadline, "the dead worker was not replaced"
        time.sleep(0.05)
    assert victim not in pool.pids and None not in pool.pids
    held = connections_on_every_worker(pool)  # the new worker serves too
    assert pool.pids[slot] in held
    for conn in held.values():
        status, _ = raw_request(
            conn, "POST", "/v1/completions", {**body, "stream": False, "max_tokens": 2}
        )
        assert status == 200
        conn.close()
    # The coordinator freed the dead worker's request; the dead worker's counts are kept.
    m = scrape(pool.url)
    assert m[SUCCESS] == counted + 2
    deadline = time.monotonic() + 10
    while m[("megatron_coord_coordinator_requests_in_flight", ())] != 0:
        assert time.monotonic() < deadline, "the dead worker's request stayed in flight"
        time.sleep(0.1)
        m = scrape(pool.url)


def test_the_command_serves_with_two_workers_and_stops_on_sigterm(stack: WorkerStack) -> None:
    from _procs import free_port

    port = free_port()
    command = [sys.executable, "-m", "megatron_coord.serving", "--coordinator-address"]
    command += [stack.address, "--port", str(port), "--model-name", MODEL, "--http-workers", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port} with 2 HTTP workers" in line, line
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": MODEL, "prompt": "ok", "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
