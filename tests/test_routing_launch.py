"""A real torchrun launch of launch/serve.py with --routing least_loaded (2 replicas, gloo):
a burst of short requests avoids the replica streaming a long one; aborting that stream ends
it with one ABORTED record; partial texts concatenate to the final text; clean STOP."""

from __future__ import annotations

import asyncio

import pytest
from _procs import ServeLaunch

pytestmark = pytest.mark.torchrun

LONG = {"top_k": 1, "num_tokens_to_generate": 110, "streaming_interval": 1}
# Every model step takes at least this long, so the long request still has most of its tokens
# to go when the shorts arrive, however late a loaded host lets the client send them (at full
# speed the tiny model could finish ~100 tokens in that lag, and least_loaded would then rightly
# send a short to its replica).
SLOW_STEPS = {
    "MEGATRON_COORD_STEP_HOOK": "megatron_coord.testing.step_faults:from_env",
    "MEGATRON_COORD_FAULT_SLEEP_S": "0.02",
}
SHORT = {"top_k": 1, "num_tokens_to_generate": 4}


async def _session(address: str) -> dict:
    from megatron_coord.client import InferenceClient

    client = InferenceClient(address)
    await client.start()
    stream = client.add_request_streaming([464, 2068, 7586], LONG)
    first = await stream.__anext__()  # the long request is running on one replica
    shorts = [client.add_request([40, 588, 257], SHORT) for _ in range(4)]  # 7 tokens each
    client.abort_request(first["request_id"])
    rest = [item async for item in stream]
    short_records = await asyncio.gather(*shorts)
    text_parts, final = [], None
    async for item in client.add_request_streaming(
        "Grüße, 世界 🙂", {**SHORT, "streaming_interval": 2}
    ):
        if "requests" in item:
            final = item["requests"][0]
        else:
            text_parts.append(item["text"])
    await asyncio.wait_for(client.stop_engines(), 60)
    client.stop()
    return {"rest": rest, "shorts": short_records, "text_parts": text_parts, "final": final}


def test_least_loaded_launch_routes_streams_and_aborts(tmp_path, checkpoint):  # noqa: F811
    server = ServeLaunch(
        tmp_path,
        checkpoint,
        2,
        1,
        *("--routing", "least_loaded", "--max-batch-size", "1"),
        env=SLOW_STEPS,
    )
    try:
        found = asyncio.run(asyncio.wait_for(_session(server.address), 120))
        assert server.wait() == 0
    finally:
        server.kill()
    finals = [item for item in found["rest"] if "requests" in item]
    assert len(finals) == 1 and found["rest"][-1] is finals[0]
    (aborted,) = finals[0]["requests"]
    assert aborted["status"] == "ABORTED"
    assert len(aborted["generated_tokens"]) < LONG["num_tokens_to_generate"]
    long_rank = aborted["data_parallel_rank"]
    # 4 x 7 tokens < the ~100 tokens the long request still had (>= 2 s of 20 ms steps): all go
    # to the other replica.
    short_ranks = [r["requests"][0]["data_parallel_rank"] for r in found["shorts"]]
    assert short_ranks == [1 - long_rank] * 4
    assert all(len(r["requests"][0]["generated_tokens"]) == 4 for r in found["shorts"])
    assert "".join(found["text_parts"]) == found["final"]["generated_text"]
    assert found["final"]["prompt"] == "Grüße, 世界 🙂"
