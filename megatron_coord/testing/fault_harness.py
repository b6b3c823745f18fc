"""Real processes for fault-injection tests and benchmarks: a standalone coordinator and
replicas that join it as separate torchrun jobs, plus a synchronous STATS probe.

Each replica job is ``torchrun --nproc-per-node 1 launch/serve.py --coordinator-address A``;
``kill9()`` SIGKILLs the job's serving rank (its pid comes from the registration the coordinator
shows in STATS), which is what a crashed replica looks like to the coordinator. Every process
carries a marker in its environment so callers can prove none is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import msgspec
import zmq

from ..protocol import PROTOCOL_VERSION, Headers

MARKER_VARIABLE = "MEGATRON_COORD_TEST_MARKER"


def marked_env(marker: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``marker`` (inherited by every child, so
    ``processes_with`` finds them all), one OMP thread, and ``extra``."""
    env = dict(os.environ)
    env[MARKER_VARIABLE] = marker
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


class StandaloneCoordinator:
    """``python -m megatron_coord.coordinator`` in a subprocess; ``address`` once bound."""

    def __init__(self, tokenizer: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.marker = uuid.uuid4().hex
        self._dir = tempfile.mkdtemp(prefix="megatron-coord-")
        address_file = os.path.join(self._dir, "address")
        command = [sys.executable, "-m", "megatron_coord.coordinator", "--port", "0"]
        command += ["--tokenizer", tokenizer, "--address-file", address_file, *args]
        self.process = subprocess.Popen(command, env=marked_env(self.marker, env))
        self.address = self._wait_for(address_file, 120.0)

    def _wait_for(self, path: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.process.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("the coordinator did not bind in time")
            time.sleep(0.05)
        with open(path) as f:
            return f.read().strip()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class ReplicaJob:
    """One torchrun job whose replica(s) join the coordinator at ``address``."""

    def __init__(
        self,
        address: str,
        model: str,
        *args: str,
        env: dict[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.marker = uuid.uuid4().hex
        self.log_path = log_path
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
            "--rdzv-backend", "static", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--node-rank", "0", "--nnodes", "1",
            "-m", "megatron_coord.launch.serve", "--model", model,
            "--coordinator-address", address, *args,
        ]  # fmt: skip
        log = open(log_path, "wb") if log_path else None  # noqa: SIM115 - the child's
        try:
            self.process = subprocess.Popen(
                command, env=marked_env(self.marker, env), stdout=log, stderr=log
            )
        finally:
            if log is not None:
                log.close()

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        """End the whole job (agent and ranks): for cleanup."""
        for pid in processes_with(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``marker``."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            pids.append(int(entry))
        except OSError:
            continue
    return pids


class StatsProbe:
    """A synchronous client of our protocol that asks the coordinator for STATS."""

    def __init__(self, address: str, auth_keys: str | None = None) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if auth_keys is not None:
            from ..auth import apply_client

            apply_client(self.socket, auth_keys)
        self.socket.connect(address)
        self.socket.send(
            msgspec.msgpack.encode([int(Headers.CONNECT), {"protocol": PROTOCOL_VERSION}])
        )
        self._expect(Headers.CONNECT_ACK, 30.0)

    def _expect(self, header: Headers, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000)):
                raise TimeoutError(f"no {header.name} from the coordinator")
            message = msgspec.msgpack.decode(self.socket.recv())
            if message[0] == header:
                return message

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        self.socket.send(msgspec.msgpack.encode([int(Headers.STATS)]))
        return self._expect(Headers.STATS, timeout)[1]

    def wait_for(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        """Poll STATS until ``predicate(stats)``; TimeoutError naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} (last STATS: {stats})")
            time.sleep(0.1)

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()
