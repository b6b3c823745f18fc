"""Process helpers shared by the tests that start real launches (torchrun, serve.py).

Every process of a launch inherits a marker in its environment (``launch_env``), so a test can
list what is still alive (``processes_with``) and prove nothing is left behind. The marker and
``processes_with`` are fault_harness's, so harness jobs and test launches are found the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from megatron_coord.testing.fault_harness import free_port, marked_env, processes_with

__all__ = [
    "ROOT",
    "ServeLaunch",
    "cmdline",
    "free_port",
    "http_get",
    "launch_env",
    "processes_with",
    "torchrun",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_env(marker: str, tmp_path) -> dict[str, str]:
    """The environment of a test launch: the marker, a private cache dir, one OMP thread."""
    return marked_env(marker, {"MEGATRON_COORD_CACHE": str(tmp_path / "cache")})


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    """A single-node ``torchrun`` of ``launch/<script>`` with free ports picked by torch."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        os.path.join(ROOT, "launch", script), *args,
    ]  # fmt: skip


def http_get(url: str) -> tuple[int, dict]:
    """GET ``url``: (status, JSON body), for error statuses too."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class ServeLaunch:
    """A ``torchrun launch/serve.py`` job; ``address`` is read from its first line of output."""

    def __init__(
        self, tmp_path, checkpoint, nproc: int, tp: int, *extra: str, env: dict | None = None
    ) -> None:
        self.marker = uuid.uuid4().hex
        cmd = torchrun(
            nproc, "serve.py", "--model", checkpoint, "--tensor-parallel-size", str(tp), *extra
        )
        self.proc = subprocess.Popen(
            cmd,
            env={**launch_env(self.marker, tmp_path), **(env or {})},
            stdout=subprocess.PIPE,
            text=True,
        )
        self.address = None
        for line in self.proc.stdout:  # blocks until rank 0 prints the address
            if line.startswith("coordinator listening at "):
                self.address = line.split()[-1]
                break
        assert self.address is not None, "serve.py exited without printing its address"

    def wait(self) -> int:
        self.proc.stdout.read()
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
