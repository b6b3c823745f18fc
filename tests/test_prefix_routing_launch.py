"""A real torchrun launch of launch/serve.py with --routing prefix_aware (2 replicas, gloo):
each conversation's turns, resending the whole history, stay on one replica, whose prefix
cache then serves them (the engines' own REGISTER and HEARTBEAT block events feed the index)."""

from __future__ import annotations

import asyncio

import pytest
from _procs import ServeLaunch

pytestmark = pytest.mark.torchrun

PARAMS = {"top_k": 1, "num_tokens_to_generate": 4}


async def _conversations(address: str) -> list[list[int]]:
    """Two conversations of 4 turns, one after the other: the replica of each turn."""
    from megatron_coord.client import InferenceClient

    client = InferenceClient(address)
    await client.start()
    ranks = []
    for system in (list(range(100, 148)), list(range(300, 348))):  # 3 blocks of 16 each
        history, turns = list(system), []
        for turn in range(4):
            history += [500 + 10 * turn + i for i in range(10)]  # the user's new message
            record = (await client.add_request(list(history), PARAMS))["requests"][0]
            turns.append(record["data_parallel_rank"])
            history += record["generated_tokens"]
        ranks.append(turns)
    await asyncio.wait_for(client.stop_engines(), 60)
    client.stop()
    return ranks


def test_prefix_aware_launch_keeps_a_conversation_on_its_replica(tmp_path, checkpoint):
    server = ServeLaunch(tmp_path, checkpoint, 2, 1, "--routing", "prefix_aware")
    try:
        ranks = asyncio.run(asyncio.wait_for(_conversations(server.address), 120))
        assert server.wait() == 0
    finally:
        server.kill()
    # Both replicas idle at every turn: least_loaded would alternate them; prefix_aware keeps
    # each conversation where its history is cached.
    for turns in ranks:
        assert turns == [turns[0]] * 4, ranks
