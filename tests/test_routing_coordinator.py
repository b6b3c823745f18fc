"""Least-loaded routing through a real coordinator: raw engines (HEARTBEAT correction, STATS)
and stepped fake-engine processes (a burst avoids the replica holding a long request)."""

from __future__ import annotations

import asyncio

import zmq
from conftest import Peer, ThreadedCoordinator, register

from megatron_coord import InferenceClient


def _registered(coord: ThreadedCoordinator, count: int) -> list[Peer]:
    """Raw engines; engine i registers as data-parallel rank i."""
    engines = [register(coord.address, rank) for rank in range(count)]
    assert coord.ready.wait(30)
    return engines


def _next(engine: Peer) -> list:
    """The engine's next message, skipping the coordinator's liveness HEARTBEATs."""
    while True:
        message = engine.recv()
        if message[0] != 102:
            return message


def _receiver(engines: list[Peer]) -> tuple[int, list]:
    """Which engine got the next message (liveness HEARTBEATs skipped), and the message."""
    poller = zmq.Poller()
    for engine in engines:
        poller.register(engine.sock, zmq.POLLIN)
    while True:
        ready = dict(poller.poll(20000))
        assert ready, "no engine got a message"
        for index, engine in enumerate(engines):
            if engine.sock in ready:
                message = engine.recv()
                if message[0] != 102:
                    return index, message


def _stop(client: Peer, engines: list[Peer], coord: ThreadedCoordinator) -> None:
    client.send(10)
    for engine in engines:
        assert _next(engine) == [10]
        engine.send(11)
    assert client.recv() == [11]
    coord.join()


def _outstanding(client: Peer) -> dict[int, int]:
    """STATS: outstanding tokens per data-parallel rank."""
    client.send(105)
    message = client.recv()
    assert message[0] == 105
    return {e["data_parallel_rank"]: e["outstanding_tokens"] for e in message[1]["engines"]}


def test_heartbeat_progress_steers_the_next_request():
    coord = ThreadedCoordinator(2, routing="least_loaded")
    engines = _registered(coord, 2)
    for engine in engines:  # fresh engines report first, before any work: the baseline
        engine.send(102, {"processed_tokens": 0})
    client = Peer(coord.address).connect_ours()
    client.send(3, 0, [7] * 10, {"num_tokens_to_generate": 20})  # 30 tokens of work
    a, message = _receiver(engines)
    assert message[:3] == [3, 0, [7] * 10]
    b = 1 - a
    client.send(3, 1, [7] * 5, {"num_tokens_to_generate": 5})  # 10 tokens: the idle engine
    assert _receiver(engines)[0] == b
    assert _outstanding(client) == {a: 30, b: 10}

    # Engine a reports 25 tokens processed (prefill + 15 generated) that no reply showed yet:
    # its outstanding work is now 5, below b's 10, so the next request goes to a.
    engines[a].send(102, {"processed_tokens": 25, "queued": 0, "active": 1})
    for _ in range(1000):  # the report and the STATS request travel on different sockets
        if _outstanding(client)[a] != 30:
            break
    assert _outstanding(client) == {a: 5, b: 10}
    client.send(3, 2, [7] * 3, {"num_tokens_to_generate": 1})
    index, message = _receiver(engines)
    assert index == a and message[1] == 2

    # The final record shows the 25 reported tokens again: they are not taken off twice.
    request_id = message[1]
    record = {
        "requests": [{"request_id": 0, "prompt_tokens": [7] * 10, "generated_tokens": [1] * 20}]
    }
    engines[a].send(4, [record])
    reply = client.recv()
    assert reply[0] == 4 and reply[1] == 0
    assert _outstanding(client) == {a: 4, b: 10}  # request 2 (3 + 1) is all a holds
    record = {
        "requests": [{"request_id": request_id, "prompt_tokens": [7] * 3, "generated_tokens": [1]}]
    }
    engines[a].send(4, [record])
    assert client.recv()[1] == 2
    assert _outstanding(client) == {a: 0, b: 10}

    _stop(client, engines, coord)


def test_round_robin_keeps_no_token_accounting():
    coord = ThreadedCoordinator(2)
    engines = _registered(coord, 2)
    client = Peer(coord.address).connect_ours()
    client.send(3, 0, [7] * 10, {"num_tokens_to_generate": 20})
    client.send(3, 1, [7] * 5, {"num_tokens_to_generate": 5})
    client.send(3, 2, [7] * 5, {"num_tokens_to_generate": 5})
    engine_of = {message[1]: index for index, message in (_receiver(engines) for _ in range(3))}
    assert engine_of[0] == engine_of[2] != engine_of[1]  # alternates, blind to request sizes
    assert _outstanding(client) == {0: None, 1: None}
    _stop(client, engines, coord)


def _ranks_of_a_burst(deploy, routing: str) -> tuple[int, list[int]]:
    """One long request, then a burst of short ones, on two stepped engine processes."""
    d = deploy(2, fake_engines=False, routing=routing)
    from megatron_coord.testing.fake_engine import spawn

    for rank in range(2):
        d.engines.append(spawn(d.address, rank, step_time=(0.002, 0.0), max_batch_size=8))
    assert d.ready.wait(60)

    async def go():
        client = InferenceClient(d.address)
        await client.start()
        long = client.add_request([5] * 10, {"num_tokens_to_generate": 300})
        short = [client.add_request([6] * 4, {"num_tokens_to_generate": 4}) for _ in range(6)]
        records = await asyncio.gather(long, *short)
        await client.stop_engines()
        client.stop()
        return [r["requests"][0]["data_parallel_rank"] for r in records]

    ranks = asyncio.run(asyncio.wait_for(go(), 60))
    d.wait_stopped()
    return ranks[0], ranks[1:]


def test_a_burst_avoids_the_replica_holding_a_long_request(deploy):
    long_rank, short_ranks = _ranks_of_a_burst(deploy, "least_loaded")
    assert short_ranks == [1 - long_rank] * 6  # 6 x 8 tokens < 310 tokens
    long_rank, short_ranks = _ranks_of_a_burst(deploy, "round_robin")
    assert short_ranks.count(long_rank) == 3  # round robin alternates regardless of size


def test_deterministic_least_loaded_ignores_replies_and_reports():
    """deterministic_mode: the cumulative routed work decides, so finishing a request or a load
    report (timing) never changes where the next one goes."""
    coord = ThreadedCoordinator(2, routing="least_loaded", deterministic_mode=True)
    engines = _registered(coord, 2)  # deterministic order: by data-parallel rank
    client = Peer(coord.address).connect_ours()
    sizes = [(20, 10), (5, 5), (5, 5), (5, 5), (5, 5)]  # 30, then four of 10 tokens
    for request_id, (prompt, generate) in enumerate(sizes):
        client.send(3, request_id, [7] * prompt, {"num_tokens_to_generate": generate})
    engine_of = {message[1]: index for index, message in (_receiver(engines) for _ in sizes)}
    # 30 on rank 0; rank 1 takes 10, 20, 30; the tie at 30/30 continues round robin: rank 0.
    assert engine_of == {0: 0, 1: 1, 2: 1, 3: 1, 4: 0}
    record = {"requests": [{"request_id": 0, "prompt_tokens": [7] * 20, "generated_tokens": [1]}]}
    engines[0].send(4, [record])  # request 0 ends early on rank 0 ...
    engines[0].send(102, {"processed_tokens": 40})  # ... and rank 0 reports its progress
    assert client.recv()[:2] == [4, 0]
    client.send(3, 5, [7] * 5, {"num_tokens_to_generate": 5})
    # Routed work: rank 0 = 40, rank 1 = 30, whatever finished: rank 1.
    assert _receiver(engines)[0] == 1
    _stop(client, engines, coord)
