"""How a torchrun serving launch ends: SIGKILL of its agent leaves no process behind, and
SIGTERM drains (in-flight requests finish within --shutdown-grace or fail with shutting_down,
new ones are refused with shutting_down, then every process exits)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid

import httpx
import pytest
from _procs import launch_env, processes_with, torchrun

from megatron_coord.client import InferenceClient, RequestError
from megatron_coord.coordinator_stats import CoordinatorStats
from megatron_coord.sampling_params import SamplingParams

pytestmark = pytest.mark.torchrun

# With --max-batch-size 1 each replica decodes one request at a time, so most of the REQUESTS
# are still in flight (queued or decoding) when the first result arrives. -1 is never sampled:
# every request generates exactly N_TOKENS (the tiny model's positions: 128).
REQUESTS = 16
N_TOKENS = 100
PARAMS = SamplingParams(top_k=1, num_tokens_to_generate=N_TOKENS, termination_id=-1)


class Launch:
    """``torchrun --nproc-per-node 2 launch/serve.py`` (two replicas), output in a file."""

    def __init__(self, tmp_path, checkpoint: str, *extra: str) -> None:
        self.log = tmp_path / f"serve-{uuid.uuid4().hex[:8]}.log"
        self.marker = uuid.uuid4().hex  # inherited by every process of the launch
        command = torchrun(2, "serve.py", "--model", checkpoint, "--max-batch-size", "1", *extra)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=launch_env(self.marker, tmp_path)
            )
        self.address = self.wait_for("coordinator listening at ").split()[0]

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :]
            assert self.proc.poll() is None, self.output()
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} line:\n{self.output()}")

    def wait_healthy(self, url: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError("the HTTP server never became healthy")

    def workers(self) -> list[int]:
        """The torchrun workers (the agent's children), each the leader of its own group."""
        return [pid for pid in processes_with(self.marker) if _ppid(pid) == self.proc.pid]

    def kill(self) -> None:
        print(self.output()[-8000:])  # pytest shows it when the test failed
        for pid in processes_with(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _wait_until_gone(marker: str, timeout: float) -> list[int]:
    """Poll until no process carries ``marker`` (returns []) or ``timeout``: the survivors."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


async def _in_flight(address: str) -> tuple[InferenceClient, list[asyncio.Future]]:
    """A client with REQUESTS long generations, returned once the first has finished (so the
    engines are busy and the rest are in flight)."""
    client = InferenceClient(address)
    await client.start()
    futures = [client.add_request(f"request {i}", PARAMS) for i in range(REQUESTS)]
    await asyncio.wait_for(asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED), 60)
    return client, futures


async def _shutting_down(address: str, timeout: float = 10.0) -> None:
    """Wait until the coordinator reports that its graceful shutdown has begun."""
    stats = CoordinatorStats(address)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            reply = await stats.query(1.0)
            if reply is not None and reply.get("shutting_down"):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the coordinator never began shutting down")
    finally:
        stats.close()


async def _outcomes(futures: list[asyncio.Future], timeout: float) -> list[object]:
    """Each future's record or RequestError; fails if any is still unanswered at ``timeout``."""
    done, pending = await asyncio.wait(futures, timeout=timeout)
    assert not pending, f"{len(pending)} request(s) got no answer within {timeout} s"
    return [f.exception() or f.result() for f in futures]


def _generated(outcome: object) -> int:
    return len(outcome["requests"][0]["generated_tokens"])


def test_killing_the_agent_ends_every_process(tmp_path, checkpoint):
    launch = Launch(tmp_path, checkpoint, "--http-port", "0")
    try:
        launch.wait_for("OpenAI-compatible API at ")
        # torchrun, 2 ranks, the coordinator, the HTTP server (and multiprocessing's tracker).
        assert len(processes_with(launch.marker)) >= 5

        async def scenario() -> list[object]:
            client, futures = await _in_flight(launch.address)
            try:
                waiting = [f for f in futures if not f.done()]
                os.kill(launch.proc.pid, signal.SIGKILL)
                # Rank 0 dies with its agent; its coordinator, told so, answers everything.
                return await _outcomes(waiting, 5.0)
            finally:
                client.stop()

        outcomes = asyncio.run(scenario())
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert failed, outcomes  # (one may have finished just before the kill)
        assert all(isinstance(o, RequestError) and o.code == "shutting_down" for o in failed)
        assert _wait_until_gone(launch.marker, 10.0) == [], launch.output()
    finally:
        launch.kill()


def _http_completion(url: str, out: dict[str, object]) -> None:
    """POST a long greedy completion; its status code (or transport error) goes to ``out``."""
    body = {"model": "tiny", "prompt": "over HTTP", "max_tokens": N_TOKENS, "temperature": 0}
    try:
        out["status"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code
    except httpx.TransportError as exc:
        out["error"] = exc


def test_sigterm_drains_in_flight_requests_then_every_process_exits(tmp_path, checkpoint):
    launch = Launch(
        tmp_path, checkpoint, "--shutdown-grace", "60", "--http-port", "0",
        "--served-model-name", "tiny",
    )  # fmt: skip
    url = launch.wait_for("OpenAI-compatible API at ").split()[0].removesuffix("/v1")
    launch.wait_healthy(url)
    in_flight_http: dict[str, object] = {}
    late_http: dict[str, object] = {}
    http = threading.Thread(target=_http_completion, args=(url, in_flight_http), daemon=True)

    async def scenario() -> tuple[int, list[object], RequestError]:
        http.start()  # queued behind the client's requests (one at a time per replica)
        client, futures = await _in_flight(launch.address)
        try:
            waiting = [f for f in futures if not f.done()]
            launch.proc.send_signal(signal.SIGTERM)  # torchrun passes it to every worker
            await _shutting_down(launch.address)
            with pytest.raises(RequestError) as refused:
                await asyncio.wait_for(client.add_request("too late", PARAMS), 10)
            await asyncio.to_thread(_http_completion, url, late_http)
            return len(waiting), await _outcomes(futures, 30.0), refused.value
        finally:
            client.stop()

    try:
        waiting, outcomes, refused = asyncio.run(scenario())
        assert refused.code == "shutting_down", launch.output()
        http.join(30)
        assert in_flight_http == {"status": 200}, launch.output()  # HTTP let it finish too
        # ...and took no new one: its listener is closed (or the coordinator refused it).
        assert "error" in late_http or late_http == {"status": 503}, late_http
        assert waiting >= 2  # the drain had requests to finish
        assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
        assert all(_generated(o) == N_TOKENS for o in outcomes)
        started = time.monotonic()
        # Prompt once drained: the STOP round ends every rank, long before the 60 s grace would
        # (a launch left to run out its grace exits at least 30 s after the outcomes, which
        # came within 30 s of the SIGTERM). The margin is for a host loaded by other work.
        launch.proc.wait(timeout=40)
        assert time.monotonic() - started < 30, launch.output()
        assert _wait_until_gone(launch.marker, 5.0) == [], launch.output()
        output = launch.output()
        assert "forcefully exiting" not in output  # torchrun never had to SIGKILL a worker
        assert "coordinator was lost" not in output and "no STOP by the end" not in output
    finally:
        launch.kill()


def test_short_grace_fails_the_rest_with_shutting_down_and_exits_zero(tmp_path, checkpoint):
    launch = Launch(tmp_path, checkpoint, "--shutdown-grace", "0.2")

    async def scenario() -> list[object]:
        client, futures = await _in_flight(launch.address)
        try:
            # What torchrun does with a SIGTERM: pass it to each worker's process group (the
            # worker and its children). Its own exit code then tells how the workers ended.
            for worker in launch.workers():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker, signal.SIGTERM)
            return await _outcomes(futures, 10.0)
        finally:
            client.stop()

    try:
        outcomes = asyncio.run(scenario())
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert failed, "every request finished within a 0.2 s grace: no drain was tested"
        assert all(isinstance(o, RequestError) and o.code == "shutting_down" for o in failed)
        finished = [o for o in outcomes if not isinstance(o, BaseException)]
        assert all(_generated(o) == N_TOKENS for o in finished)
        assert launch.proc.wait(timeout=15) == 0, launch.output()  # every worker exited 0
        assert _wait_until_gone(launch.marker, 5.0) == [], launch.output()
    finally:
        launch.kill()
