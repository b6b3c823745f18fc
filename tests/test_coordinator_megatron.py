"""Megatron-core 0.16 interop: its own InferenceClient and its engine protocol, unchanged."""

from __future__ import annotations

import asyncio

# scripts/setup.sh installs megatron-core 0.16.1: a missing install fails here, never skips.
import megatron.core.inference.inference_client  # noqa: F401


def test_megatron_client_against_our_coordinator(deploy):
    from megatron.core.inference.inference_client import InferenceClient
    from megatron.core.inference.inference_request import DynamicInferenceRequestRecord
    from megatron.core.inference.sampling_params import SamplingParams

    d = deploy(2, megatron_style=True)

    async def go():
        client = InferenceClient(d.address)
        await client.start()
        futures = [
            client.add_request(f"prompt {i}", SamplingParams(num_tokens_to_generate=4))
            for i in range(6)
        ]
        futures.append(client.add_request([72, 105, 33], SamplingParams(num_tokens_to_generate=3)))
        records = await asyncio.gather(*futures)
        await client.pause_engines()
        client.unpause_engines()
        await client.stop_engines()
        client.stop()
        return records

    records = asyncio.run(asyncio.wait_for(go(), 60))
    assert all(isinstance(r, DynamicInferenceRequestRecord) for r in records)
    for i, record in enumerate(records[:6]):
        request = record.requests[0]
        assert request.prompt == f"prompt {i}"
        assert request.generated_text == "prom"
        assert request.prompt_tokens.tolist() == list(f"prompt {i}".encode())
        assert request.status.name == "COMPLETED"
    assert records[6].requests[0].prompt == "Hi!"
    assert records[6].requests[0].generated_text == "Hi!"
    d.wait_stopped()
    assert d.process.exitcode == 0
    assert [e.returncode for e in d.engines] == [0, 0]
