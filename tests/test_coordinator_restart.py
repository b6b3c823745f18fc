"""Clients outlive the coordinator: the standalone coordinator is killed with SIGKILL while two
clients and the HTTP front end have requests in flight on a joined replica, then restarted on
the same port. With resubmission off every request fails within the detection time plus a
margin; with it on, every request of which nothing reached the caller gets its result from the
restarted coordinator; the same client objects and the same HTTP server then serve new requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
from _procs import http_get

from megatron_coord import InferenceClient, SamplingParams
from megatron_coord.testing.fault_harness import (
    ReplicaJob,
    StandaloneCoordinator,
    free_port,
    processes_with,
)

DETECTION_S = 3.0  # the client's default coordinator_timeout
MARGIN_S = 2.5
TOKENS = 150  # exactly (no stop token): one at a time, each takes about half a second
LONG = SamplingParams(num_tokens_to_generate=TOKENS, top_k=1, termination_id=-1)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _prompt(i: int) -> list[int]:
    return [11 + i, 12, 13]


async def _first_part(stream) -> dict:
    return await stream.__anext__()


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def test_clients_and_http_outlive_a_killed_coordinator(tmp_path):
    from megatron_coord.models.default_model import default_checkpoint_dir
    from megatron_coord.serving import HTTPServerThread

    checkpoint = default_checkpoint_dir()  # 1,024 positions: room for long generations

    port = str(free_port())
    coordinator = StandaloneCoordinator(checkpoint, "--port", port)
    job = ReplicaJob(
        coordinator.address, checkpoint, "--max-batch-size", "1", log_path=str(tmp_path / "r")
    )
    http = HTTPServerThread(coordinator.address).start()
    completions = f"{http.url}/v1/completions"
    restarted = None

    async def scenario() -> None:
        nonlocal restarted
        loop = asyncio.get_running_loop()
        keeps = InferenceClient(coordinator.address)  # resubmits (the default)
        fails = InferenceClient(coordinator.address, resubmit=False)
        await keeps.start()
        await fails.start()
        try:
            await keeps.wait_ready(min_engines=1, timeout=180)
            streamed = keeps.add_request_streaming(_prompt(99), LONG)
            await asyncio.wait_for(_first_part(streamed), 60)  # part of it reached us
            kept = [keeps.add_request(_prompt(i), LONG) for i in range(20)]
            lost = [fails.add_request(_prompt(i), LONG) for i in range(20)]
            over_http = loop.run_in_executor(
                None,
                _post,
                completions,
                {"model": "megatron_coord", "prompt": "Hi", "max_tokens": 8},
            )
            await asyncio.sleep(0.1)  # everything has reached the replica
            assert not any(f.done() for f in kept + lost), [
                f.exception() or f.result()["requests"][0]["finish_reason"]
                for f in kept + lost
                if f.done()
            ][:3]

            killed_at = time.monotonic()
            coordinator.process.kill()
            coordinator.process.wait()
            outcomes = await asyncio.wait_for(
                asyncio.gather(*lost, return_exceptions=True), DETECTION_S + MARGIN_S
            )
            assert all(isinstance(o, ConnectionError) for o in outcomes), outcomes[:3]
            assert "lost the coordinator" in str(outcomes[0])
            with pytest.raises(ConnectionError, match="streamed to you"):
                await asyncio.wait_for(_drain(streamed), MARGIN_S)  # parts before the loss
            assert time.monotonic() - killed_at < DETECTION_S + MARGIN_S
            assert not keeps.connected.is_set() and not any(f.done() for f in kept)
            status, body = http_get(f"{http.url}/health/ready")
            assert status == 503 and body["error"]["code"] == "no_coordinator"
            status, body = await loop.run_in_executor(
                None, _post, completions, {"model": "megatron_coord", "prompt": "x"}
            )
            assert status == 503 and body["error"]["code"] == "no_coordinator"

            restarted = StandaloneCoordinator(checkpoint, "--port", port)
            assert restarted.address == coordinator.address
            records = await asyncio.wait_for(asyncio.gather(*kept), 180)
            tokens = [r["requests"][0]["generated_tokens"] for r in records]
            assert [len(t) for t in tokens] == [TOKENS] * 20
            status, body = await asyncio.wait_for(over_http, 120)
            assert status == 200 and body["usage"]["completion_tokens"] == 8
            assert keeps.reconnects == 1
            await asyncio.wait_for(fails.connected.wait(), 30)
            for client in (keeps, fails):  # the same objects serve new requests
                record = await asyncio.wait_for(client.add_request(_prompt(0), LONG), 120)
                assert record["requests"][0]["generated_tokens"] == tokens[0]  # greedy: same
            assert http_get(f"{http.url}/health/ready")[0] == 200
            await keeps.stop_engines()
        finally:
            keeps.stop()
            fails.stop()

    try:
        asyncio.run(scenario())
        assert restarted.wait(60) == 0
        assert job.wait(60) == 0
        assert processes_with(job.marker) == []
    finally:
        http.stop()
        job.kill()
        coordinator.kill()
        if restarted is not None:
            restarted.kill()
