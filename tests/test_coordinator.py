"""The coordinator's protocol with real processes and sockets: handshake, routing, id mapping,
detokenization, pause/stop acknowledgements, deterministic order, state cleanup."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import zmq
from conftest import Peer, ThreadedCoordinator, register, stop_with_raw_engines

from megatron_coord import InferenceClient, SamplingParams
from megatron_coord.testing.fake_engine import ByteTokenizer, spawn

PARAMS = SamplingParams(num_tokens_to_generate=4).serialize()


def submit_and_get(peer: Peer, request_id: int, prompt, params=PARAMS) -> dict:
    peer.send(3, request_id, prompt, params)
    header, reply_id, record = peer.recv()
    assert (header, reply_id) == (4, request_id)
    return record["requests"][0]


def test_handshake_ours_and_megatron(deploy):
    d = deploy(1)
    ours = Peer(d.address)
    ours.send(1, {"protocol": 1})
    assert ours.recv() == [2]
    megatron = Peer(d.address)
    megatron.send(1)
    assert megatron.recv() == [2]
    # A second CONNECT is acknowledged again (a client that lost the first ack can retry).
    megatron.send(1)
    assert megatron.recv() == [2]
    assert submit_and_get(megatron, 0, [104, 105])["generated_text"] == "hihi"


def test_round_robin_alternates_engines(deploy):
    d = deploy(2)
    peer = Peer(d.address).connect_ours()
    ranks = [submit_and_get(peer, i, "abc")["data_parallel_rank"] for i in range(8)]
    assert sorted(set(ranks)) == [0, 1]
    assert all(a != b for a, b in zip(ranks, ranks[1:], strict=False)), ranks


def _register_in_reverse(address: str, megatron_style: bool) -> list:
    """Start fake engines rank 2, 1, 0, each after the previous registered (reverse arrival)."""
    engines = []
    for rank in (2, 1, 0):
        engines.append(spawn(address, rank, megatron_style=megatron_style))
        time.sleep(0.5)  # arrival order only; nothing asserted depends on timing
    return engines


def test_deterministic_mode_routes_by_data_parallel_rank():
    """Engines arrive in reverse rank order; requests still land on ranks 0, 1, 2, 0, 1, 2."""
    coord = ThreadedCoordinator(3, deterministic_mode=True)
    engines = _register_in_reverse(coord.address, megatron_style=False)
    assert coord.ready.wait(60)
    peer = Peer(coord.address).connect_ours()
    ranks = [submit_and_get(peer, i, "abc")["data_parallel_rank"] for i in range(6)]
    assert ranks == [0, 1, 2, 0, 1, 2]
    peer.send(10)
    assert peer.recv() == [11]
    coord.join()
    assert [e.wait(30) for e in engines] == [0, 0, 0]


def test_deterministic_mode_reads_megatron_identities():
    coord = ThreadedCoordinator(3, deterministic_mode=True)
    engines = _register_in_reverse(coord.address, megatron_style=True)
    assert coord.ready.wait(60)
    peer = Peer(coord.address).connect_ours()
    peer.send(10)
    assert peer.recv() == [11]
    coordinator = coord.join()
    order = list(coordinator.identities_of_data_parallel_ranks)
    assert order == [b"mp-coord-0", b"mp-coord-1", b"mp-coord-2"]
    assert [e.wait(30) for e in engines] == [0, 0, 0]


def test_two_clients_with_the_same_ids_get_their_own_replies(deploy):
    d = deploy(2)

    async def run(prefix: str) -> list[tuple[str, str]]:
        client = InferenceClient(d.address)
        await client.start()
        futures = [
            client.add_request(f"{prefix}-{i}", SamplingParams(num_tokens_to_generate=3))
            for i in range(20)
        ]
        records = await asyncio.gather(*futures)
        client.stop()
        return [(r["requests"][0]["prompt"], r["requests"][0]["generated_text"]) for r in records]

    async def both():
        return await asyncio.gather(run("alpha"), run("beta"))

    alpha, beta = asyncio.run(both())
    assert alpha == [(f"alpha-{i}", "alp") for i in range(20)]
    assert beta == [(f"beta-{i}", "bet") for i in range(20)]


def test_detokenization_fills_prompt_and_text(deploy):
    d = deploy(1, megatron_style=True)
    peer = Peer(d.address).connect_ours()
    # Token prompt: Megatron-style engines send prompt_tokens as ["tensor", ids] and prompt None.
    record = submit_and_get(peer, 1, list("héllo".encode()))
    assert record["prompt"] == "héllo"
    assert record["generated_text"] == "hél"  # 4 bytes: h, é (2 bytes), l
    assert record["prompt_tokens"] == ["tensor", list("héllo".encode())]
    # Text prompt: tokenized on the coordinator, the original text comes back as the prompt.
    record = submit_and_get(peer, 2, "wörld")
    assert record["prompt"] == "wörld"
    assert record["generated_text"] == "wör"  # w, ö (2 bytes), r


def test_detokenization_with_real_gpt2_tokenizer(deploy):
    from megatron_coord.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    d = deploy(1, tokenizer=tokenizer)
    peer = Peer(d.address).connect_ours()
    texts = [f"The quick brown fox number {i} jumps over the lazy dog." for i in range(12)]
    # Submitted back to back: they are drained together and tokenized in one batched call.
    for i, text in enumerate(texts):
        peer.send(3, i, text, PARAMS)
    replies = {}
    for _ in texts:
        header, request_id, record = peer.recv()
        assert header == 4
        replies[request_id] = record["requests"][0]
    for i, text in enumerate(texts):
        tokens = tokenizer.tokenize(text)
        assert replies[i]["prompt"] == text
        assert replies[i]["prompt_tokens"] == ["tensor", tokens]
        assert replies[i]["generated_text"] == tokenizer.detokenize(tokens[:4])
    record = submit_and_get(peer, 99, tokenizer.tokenize(" Hello there"))
    assert record["prompt"] == " Hello there"


def test_extra_record_keys_pass_through(deploy):
    d = deploy(1)
    peer = Peer(d.address).connect_ours()
    record = submit_and_get(peer, 5, "xyz")
    assert record["finish_reason"] == "length"
    assert record["status"] == "COMPLETED"
    assert record["data_parallel_rank"] == 0


def test_pause_ack_only_after_every_engine_and_stop_ends_the_loop():
    coord = ThreadedCoordinator(2)
    engines = [register(coord.address, rank) for rank in range(2)]
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    other = Peer(coord.address).connect_ours()
    client.send(5)
    for engine in engines:
        assert engine.recv() == [5]
    engines[0].send(6)
    engines[0].send(6)  # a duplicate ack must not count twice
    assert not client.poll(300), "PAUSE_ACK sent before every engine acked"
    engines[1].send(6)
    assert client.recv() == [6]
    assert other.recv() == [6]  # every client hears it
    for engine in engines:
        assert engine.recv() == [6]
    client.send(7)  # UNPAUSE is relayed
    for engine in engines:
        assert engine.recv() == [7]
    client.send(10)
    for engine in engines:
        assert engine.recv() == [10]
    # After STOP, engines (Megatron's assert this) must see nothing but STOP_ACK.
    client.send(3, 1, "late", {})
    assert client.recv()[:3] == [100, 1, "shutting_down"]
    client.send(5)
    assert client.recv()[:3] == [100, None, "shutting_down"]
    engines[1].send(11)
    assert not client.poll(300), "STOP_ACK sent before every engine acked"
    engines[0].send(11)
    assert client.recv() == [11]
    for engine in engines:
        assert engine.recv() == [11]
    coord.join()  # the serve loop ended by itself


def test_suspend_resume_relayed_to_every_engine():
    coord = ThreadedCoordinator(2)
    engines = [Peer(coord.address, identity=f"mp-coord-{r}".encode()) for r in range(2)]
    for engine in engines:
        engine.send_raw(b"")
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    for header in (8, 9):
        client.send(header)
        for engine in engines:
            assert engine.recv() == [header]
    stop_with_raw_engines(coord, client, engines)


def test_per_request_state_is_freed_in_every_path():
    coord = ThreadedCoordinator(1)
    engine = register(coord.address, 0)
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    gone = Peer(coord.address).connect_ours()
    record = {"prompt": None, "prompt_tokens": [65], "generated_tokens": [66]}
    # 1: normal reply
    client.send(3, "a", [65], PARAMS)
    _, rid_a, _, _ = engine.recv()
    engine.send(4, [{"requests": [{"request_id": rid_a, **record}]}])
    assert client.recv()[:2] == [4, "a"]
    # 2: engine ERROR
    client.send(3, "b", "B", PARAMS)
    _, rid_b, _, _ = engine.recv()
    engine.send(100, rid_b, "engine_failed", "out of memory")
    assert client.recv() == [100, "b", "engine_failed", "out of memory"]
    # 3: abort, answered by an ABORTED record
    client.send(3, "c", [67], {"streaming_interval": 1})
    _, rid_c, _, _ = engine.recv()
    client.send(104, "c")
    assert engine.recv() == [104, rid_c]
    engine.send(4, [{"requests": [{"request_id": rid_c, "status": "ABORTED", **record}]}])
    assert client.recv()[2]["requests"][0]["status"] == "ABORTED"
    # 4: the client disconnects before its reply
    gone.send(3, "d", [68], PARAMS)
    _, rid_d, _, _ = engine.recv()
    gone.close()
    engine.send(4, [{"requests": [{"request_id": rid_d, **record}]}])
    # 5: undetokenizable reply (ByteTokenizer has 256 ids)
    client.send(3, "e", [69], PARAMS)
    message = engine.recv()
    if message == [104, rid_d]:  # the coordinator saw the client go first: it aborted "d"
        message = engine.recv()
    _, rid_e, _, _ = message
    bad = {"prompt": None, "prompt_tokens": [65], "generated_tokens": [9999]}
    engine.send(4, [{"requests": [{"request_id": rid_e, **bad}]}])
    header, request_id, code, _ = client.recv()
    assert (header, request_id, code) == (100, "e", "engine_failed")
    coordinator = stop_with_raw_engines(coord, client, [engine])
    assert coordinator.next_request_id == 5
    assert coordinator.request_id_to_client_id == {}
    assert coordinator.request_id_to_client_request_id == {}
    assert coordinator.state.requests.engine_of == {}
    assert coordinator.state.requests.inflight == {}
    assert coordinator.state.requests.prompt_text == {}
    assert coordinator.state.requests.streams == {}


def test_client_frames_sent_before_engines_register_are_served():
    coord = ThreadedCoordinator(1)
    client = Peer(coord.address)
    client.send(1, {"protocol": 1})
    client.send(3, 0, [72, 73], PARAMS)
    assert not client.poll(200)  # no engine yet: nothing answers, nothing is lost
    engine = spawn(coord.address, 0)
    assert client.recv() == [2]
    header, request_id, record = client.recv()
    assert (header, request_id, record["requests"][0]["generated_text"]) == (4, 0, "HIHI")
    client.send(10)
    assert client.recv() == [11]
    coord.join()
    assert engine.wait(30) == 0


def test_port_in_use_falls_back_to_a_random_port(deploy):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        d = deploy(1, inference_coordinator_port=port)
        assert d.address.startswith("tcp://127.0.0.1:")
        assert not d.address.endswith(f":{port}")
        assert submit_and_get(Peer(d.address).connect_ours(), 0, "ok")["generated_text"] == "okok"
    finally:
        blocker.close()


def test_free_port_is_used(deploy):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    d = deploy(1, inference_coordinator_port=port)
    assert d.address == f"tcp://127.0.0.1:{port}"


def test_stop_through_our_client_stops_engines_and_coordinator(deploy):
    d = deploy(2)

    async def run():
        client = InferenceClient(d.address)
        await client.start()
        record = await client.add_request("stop me", SamplingParams(num_tokens_to_generate=2))
        await client.pause_engines()
        held = client.add_request("held", SamplingParams(num_tokens_to_generate=2))
        await asyncio.sleep(0)
        assert not held.done()
        client.unpause_engines()
        held_record = await held
        await client.stop_engines()
        client.stop()
        return record, held_record

    record, held_record = asyncio.run(run())
    assert record["requests"][0]["generated_text"] == "st"
    assert held_record["requests"][0]["generated_text"] == "he"
    d.wait_stopped()
    assert d.process.exitcode == 0
    assert [e.returncode for e in d.engines] == [0, 0]


def test_coordinator_rejects_bad_constructor_arguments():
    from megatron_coord.coordinator import DataParallelInferenceCoordinator

    with pytest.raises(ValueError, match="data_parallel_size"):
        DataParallelInferenceCoordinator(None, -1, ByteTokenizer())  # 0: any number
    with pytest.raises(TypeError, match="tokenizer"):
        DataParallelInferenceCoordinator(None, 1, object())
    with pytest.raises(TypeError, match="unknown coordinator options"):
        DataParallelInferenceCoordinator(None, 1, ByteTokenizer(), colour="blue")
    with pytest.raises(TimeoutError, match="0 of 1 engines"):
        DataParallelInferenceCoordinator(None, 1, ByteTokenizer(), registration_timeout=0.05)


def test_a_constructor_that_fails_closes_its_socket():
    """A registration timeout leaves nothing open: the port can be bound again at once (left
    to the garbage collector, the context could be destroyed before its sockets and hang)."""
    from megatron_coord.coordinator import DataParallelInferenceCoordinator
    from megatron_coord.testing.fault_harness import free_port

    port = free_port()
    with pytest.raises(TimeoutError, match="0 of 1 engines"):
        DataParallelInferenceCoordinator(None, 1, ByteTokenizer(), port, registration_timeout=0.05)
    with zmq.Context() as context, context.socket(zmq.ROUTER) as sock:
        sock.bind(f"tcp://127.0.0.1:{port}")  # EADDRINUSE if the ROUTER were still open
