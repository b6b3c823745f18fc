"""A model step that raises on one TP rank only, in a real ``torchrun --nproc-per-node 2`` launch
at TP=2 (gloo on CPU): the step's requests get ``engine_failed`` naming that rank, no rank hangs,
the replica serves the next requests exactly as before, and failures that are not consecutive
never make it unhealthy. The fault comes from the test hook (megatron_coord.testing.step_faults):
TP rank 1 raises after sampling in every step whose batch holds a prompt starting with MAGIC.
"""

from __future__ import annotations

import asyncio

import pytest
from _procs import ServeLaunch

from megatron_coord.client import InferenceClient, RequestError
from megatron_coord.sampling_params import SamplingParams

pytestmark = pytest.mark.torchrun

MAGIC = 7
GOOD = [5, 6, 7, 8]
PARAMS = {"top_k": 1, "num_tokens_to_generate": 6, "termination_id": -1}


async def _expect_failure(client: InferenceClient) -> None:
    with pytest.raises(RequestError) as info:
        await client.add_request([MAGIC, 6, 7], SamplingParams(**PARAMS))
    assert info.value.code == "engine_failed"
    assert "RuntimeError: injected fault" in info.value.message
    assert "on TP rank 1 (global rank 1)" in info.value.message


async def _tokens(client: InferenceClient) -> list[int]:
    record = await client.add_request(GOOD, SamplingParams(**PARAMS))
    request = record["requests"][0]
    assert request["finish_reason"] == "length"
    return request["generated_tokens"]


async def _scenario(address: str) -> None:
    client = InferenceClient(address)
    await client.start()
    try:
        before = await _tokens(client)
        assert len(before) == 6
        # fail, serve, fail, serve: with --max-step-failures 2 a second failure in a row would
        # make the replica unhealthy and the last request would get no_engine.
        for _ in range(2):
            await _expect_failure(client)
            assert await _tokens(client) == before
        await client.stop_engines()
    finally:
        client.stop()


def test_tp2_step_failing_on_one_rank_fails_its_requests_and_serves_on(
    tmp_path, checkpoint, monkeypatch
):
    monkeypatch.setenv("MEGATRON_COORD_STEP_HOOK", "megatron_coord.testing.step_faults:from_env")
    monkeypatch.setenv("MEGATRON_COORD_FAULT_TOKEN", str(MAGIC))
    monkeypatch.setenv("MEGATRON_COORD_FAULT_TP_RANKS", "1")
    launch = ServeLaunch(tmp_path, checkpoint, 2, 2, "--max-step-failures", "2")
    try:
        asyncio.run(asyncio.wait_for(_scenario(launch.address), 60))
        assert launch.wait() == 0  # every rank left after STOP: none hung
    finally:
        launch.kill()
