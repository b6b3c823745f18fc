"""prefix_aware through a real coordinator and raw engines (real sockets): text prompts routed
after tokenizing, engine block events, death and rejoin, waiting for an engine, the
per-engine limit."""

from __future__ import annotations

import time

import pytest
from conftest import Peer, ThreadedCoordinator, elastic_coordinator
from test_routing_coordinator import _receiver

from megatron_coord import DataParallelInferenceCoordinator
from megatron_coord.prefix_hash import block_hashes
from megatron_coord.testing.fake_engine import ByteTokenizer

SYSTEM = "You are a helpful assistant. Answer briefly. "  # 45 bytes: 11 blocks of 4


def _engine(address: str, rank: int) -> Peer:
    """A raw engine of ours that caches prefixes in blocks of 4 tokens."""
    engine = Peer(address)
    engine.send(101, {"data_parallel_rank": rank, "protocol": 1, "kv_block_size": 4,
                      "prefix_caching": True})  # fmt: skip
    return engine


def _finish(engine: Peer, client: Peer, message: list) -> None:
    """The engine ends the request of SUBMIT ``message``; its client gets the reply."""
    request = {"request_id": message[1], "prompt_tokens": message[2], "generated_tokens": [65]}
    record = {"requests": [request]}
    engine.send(4, [record])
    reply = client.recv()
    assert reply[0] == 4, reply


def _submit(client: Peer, request_id: int, prompt) -> None:
    client.send(3, request_id, prompt, {"num_tokens_to_generate": 1})


def _stop(coord: ThreadedCoordinator, client: Peer, engines: list[Peer]) -> None:
    client.send(10)
    for engine in engines:
        while engine.recv() != [10]:
            pass
        engine.send(11)
    assert client.recv() == [11]
    coord.join()


def _wait_engines(coord: ThreadedCoordinator, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(coord.coordinator.state.routing_policy.engines) < count:
        assert time.monotonic() < deadline, "the engines did not register"
        time.sleep(0.01)


def _policy_holds(coord: ThreadedCoordinator, count: int, timeout: float = 10.0):
    """Wait until the coordinator's index holds ``count`` names; the policy."""
    policy = coord.coordinator.state.routing_policy
    deadline = time.monotonic() + timeout
    while len(policy.index) != count:
        assert time.monotonic() < deadline, f"the index holds {len(policy.index)} names"
        time.sleep(0.01)
    return policy


def test_text_prompts_follow_their_prefix_and_the_engines_reports():
    coord = ThreadedCoordinator(2, routing="prefix_aware", engine_timeout=30)
    engines = [_engine(coord.address, rank) for rank in range(2)]
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    _submit(client, 0, SYSTEM + "What is 2+2?")
    first, message = _receiver(engines)
    assert message[2] == list((SYSTEM + "What is 2+2?").encode())  # tokenized, then routed
    _finish(engines[first], client, message)
    # The next turn resends the history: the same engine, although both are idle.
    for turn in range(1, 4):
        _submit(client, turn, SYSTEM + "What is 2+2?" + " Four." * turn)
        index, message = _receiver(engines)
        assert index == first, f"turn {turn} went to another replica"
        _finish(engines[index], client, message)

    # The other engine reports it holds another prompt's blocks: that prompt goes to it.
    other = 1 - first
    prompt = list(range(40, 80))
    engines[other].send(102, {"kv_blocks_stored": block_hashes(prompt, 4)})
    last_turn = list((SYSTEM + "What is 2+2?" + " Four." * 3).encode())
    on_first = len(block_hashes(last_turn, 4))  # every turn's blocks: one chain
    _policy_holds(coord, on_first + 10)  # and the 10 blocks reported
    _submit(client, 10, prompt + [1, 2, 3])
    index, message = _receiver(engines)
    assert index == other and message[2] == prompt + [1, 2, 3]
    _submit(client, 11, SYSTEM)  # still where it was
    assert _receiver(engines)[0] == first
    _finish(engines[other], client, message)
    # A snapshot without them: what was known of the other engine is gone.
    engines[other].send(102, {"kv_blocks_reset": True, "kv_blocks_stored": []})
    _policy_holds(coord, on_first)
    _stop(coord, client, engines)


def test_a_dead_replica_loses_its_entries_and_a_rejoined_one_starts_empty():
    coord, client = elastic_coordinator(routing="prefix_aware", engine_timeout=30)
    engines = [_engine(coord.address, rank) for rank in range(2)]
    _wait_engines(coord, 2)
    _submit(client, 0, SYSTEM)
    holder, message = _receiver(engines)
    _finish(engines[holder], client, message)
    _policy_holds(coord, 11)
    engines[holder].close()  # the replica dies: its connection closes
    _policy_holds(coord, 0)  # its entries are dropped with it
    survivor = engines[1 - holder]
    _submit(client, 1, SYSTEM)
    _, message = _receiver([survivor])
    _finish(survivor, client, message)
    _policy_holds(coord, 11)
    engines[holder] = _engine(coord.address, holder)  # a restarted replica joins
    _wait_engines(coord, 2)
    _submit(client, 2, SYSTEM)  # the survivor holds it now, the newcomer nothing
    assert _receiver([survivor, engines[holder]])[0] == 0
    _stop(coord, client, engines)


def test_requests_wait_for_an_engine_and_respect_the_per_engine_limit():
    coord, client = elastic_coordinator(
        routing="prefix_aware",
        max_outstanding_per_engine=1,
        prefix_load_factor=100.0,
        engine_timeout=30,
    )
    _submit(client, 0, SYSTEM)  # no engine yet: held
    engine = _engine(coord.address, 0)
    index, message = _receiver([engine])
    assert message[0] == 3 and message[2] == list(SYSTEM.encode())
    second = _engine(coord.address, 1)
    _wait_engines(coord, 2)
    engine.send(102, {"kv_blocks_stored": block_hashes(list(SYSTEM.encode()), 4)})
    _policy_holds(coord, 11)
    # The first engine holds the prefix but also its limit of 1 request: the other takes it.
    _submit(client, 1, SYSTEM + "more")
    assert _receiver([engine, second])[0] == 1
    _submit(client, 2, SYSTEM)  # both hold one: refused
    error = client.recv()
    assert error[0] == 100 and error[1] == 2 and error[2] == "overloaded", error
    assert coord.coordinator.state.requests.sizes()["request_engine"] == 2
    _stop(coord, client, [engine, second])


def test_megatron_engines_are_indexed_from_the_coordinators_own_decisions():
    coord = ThreadedCoordinator(2, routing="prefix_aware", prefix_load_factor=100.0)
    engines = [Peer(coord.address, identity=b"mp-coord-%d" % rank) for rank in range(2)]
    for engine in engines:
        engine.send_raw(b"")  # Megatron's registration: no block size, no reports
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    prompt = list(range(1, 101)) * 6  # 600 tokens: 2 blocks of Megatron's 256
    _submit(client, 0, prompt)
    first, _ = _receiver(engines)
    _policy_holds(coord, 2)
    _submit(client, 1, prompt[:512] + [7])  # busy, but it holds the prefix
    assert _receiver(engines)[0] == first
    _submit(client, 2, prompt[:255])  # no full block: least loaded
    assert _receiver(engines)[0] == 1 - first
    _stop(coord, client, engines)


def test_bad_prefix_options_are_refused_before_waiting_for_engines():
    with pytest.raises(ValueError, match="prefix_load_factor"):
        DataParallelInferenceCoordinator(
            None,
            1,
            ByteTokenizer(),
            routing="prefix_aware",
            prefix_load_factor=0.5,
            registration_timeout=1,  # a late check would time out instead
        )
