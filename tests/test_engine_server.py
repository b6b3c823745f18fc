"""The replica loop against a real ROUTER socket (TP=1, in process): registration, replies,
bad input, PAUSE/UNPAUSE, SUSPEND/RESUME, ABORT, streaming, STOP and shutdown."""

from __future__ import annotations

import threading

import pytest
import zmq
from test_engine import hf_greedy

from megatron_coord.engine import InferenceEngine
from megatron_coord.engine.server import EngineServer
from megatron_coord.parallel_state import single_process_state
from megatron_coord.protocol import Headers, decode, encode

GREEDY = {"top_k": 1, "num_tokens_to_generate": 6}
PROMPT = [10, 20, 30]


@pytest.fixture(scope="module")
def expected(checkpoint) -> list[int]:
    return hf_greedy(checkpoint, [PROMPT], GREEDY["num_tokens_to_generate"])[0]


class Harness:
    """A ROUTER standing in for the coordinator, and an EngineServer looping in a thread."""

    def __init__(self, model) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        engine = InferenceEngine(model, max_batch_size=2, max_seq_len=64)
        self.server = EngineServer(
            engine, single_process_state(), f"tcp://127.0.0.1:{port}", idle_timeout_s=0.05
        )
        self.identity, first = self.recv()
        info = {"data_parallel_rank": 0, "protocol": 1, "heartbeat_reply": True}
        info.update(kv_block_size=16, prefix_caching=True)  # how to name its KV blocks
        info.update(weight_version="initial", tensor_parallel_size=1)  # for weight updates
        # It never heartbeats (no interval), and that was not the user's choice.
        info.update(heartbeat_interval=None, heartbeat_interval_fixed=False)
        assert first == [Headers.REGISTER, info]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def send(self, message) -> None:
        self.router.send_multipart([self.identity, encode(message)])

    def recv(self, timeout_s: float = 30.0):
        if not self.router.poll(int(timeout_s * 1000)):
            raise TimeoutError("no message from the engine")
        identity, frame = self.router.recv_multipart()
        return identity, decode(frame)

    def message(self, timeout_s: float = 30.0):
        return self.recv(timeout_s)[1]

    def quiet_for(self, timeout_s: float) -> bool:
        return not self.router.poll(int(timeout_s * 1000))

    def close(self) -> None:
        self.server.request_shutdown()
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.server.close()
        self.router.close(0)
        self.context.term()


@pytest.fixture
def harness(model):
    h = Harness(model)
    yield h
    h.close()


def _record(message) -> dict:
    assert message[0] == Headers.ENGINE_REPLY
    (record,) = message[1]
    (request,) = record["requests"]
    return request


def test_serves_a_request(harness, expected):
    assert harness.identity == b"mp-coord-0"
    harness.send([Headers.SUBMIT_REQUEST, 7, PROMPT, GREEDY])
    request = _record(harness.message())
    assert request["request_id"] == 7 and request["generated_tokens"] == expected
    assert request["status"] == "COMPLETED" and request["data_parallel_rank"] == 0


def test_bad_input_gets_errors_and_never_stops_the_engine(harness, expected):
    harness.router.send_multipart([harness.identity, b"\xc1 not msgpack"])
    harness.send([999])  # unknown header: logged, ignored
    cases = {
        1: [Headers.SUBMIT_REQUEST, 1, PROMPT, {"top_k": "one"}],
        2: [Headers.SUBMIT_REQUEST, 2, "text prompt", GREEDY],
        3: [Headers.SUBMIT_REQUEST, 3, list(range(64)), GREEDY],
        4: [Headers.SUBMIT_REQUEST, 4, [50257], GREEDY],
        5: [Headers.SUBMIT_REQUEST, 5, PROMPT],
        6: [Headers.SUBMIT_REQUEST, 6, PROMPT, {"no_such_param": 1}],
    }
    for message in cases.values():
        harness.send(message)
    errors = {}
    for _ in cases:
        message = harness.message()
        assert message[0] == Headers.ERROR
        errors[message[1]] = message[2]
    assert errors == {
        1: "invalid_request",
        2: "invalid_request",
        3: "invalid_request",
        4: "invalid_request",
        5: "malformed",
        6: "invalid_request",
    }
    harness.send([Headers.SUBMIT_REQUEST, 8, PROMPT, GREEDY])
    assert _record(harness.message())["generated_tokens"] == expected


def test_a_request_sent_again_that_it_holds_keeps_the_one_it_has(harness):
    """A resubmission after a false death is no error (issue 22): one result, no ERROR."""
    long = {"top_k": 1, "num_tokens_to_generate": 40}
    harness.send([Headers.SUBMIT_REQUEST, 9, PROMPT, long])
    harness.send([Headers.SUBMIT_REQUEST, 9, PROMPT, long])
    assert len(_record(harness.message())["generated_tokens"]) == 40
    harness.send([Headers.SUBMIT_REQUEST, 9, PROMPT, long])  # once ended, the id is free again
    assert len(_record(harness.message())["generated_tokens"]) == 40
    assert harness.quiet_for(0.3)


def test_pause_holds_requests_until_unpause(harness, expected):
    harness.send([Headers.PAUSE])
    assert harness.message() == [Headers.PAUSE_ACK]
    harness.send([Headers.PAUSE_ACK])  # the coordinator's "all engines paused"
    harness.send([Headers.SUBMIT_REQUEST, 11, PROMPT, GREEDY])
    assert harness.quiet_for(0.5)  # paused: the request waits
    assert harness.server.paused and harness.server.engine.num_requests == 1
    harness.send([Headers.UNPAUSE])
    assert _record(harness.message())["generated_tokens"] == expected


def test_suspend_and_resume(harness, expected):
    harness.send([Headers.PAUSE])
    assert harness.message() == [Headers.PAUSE_ACK]
    harness.send([Headers.SUSPEND])
    harness.send([Headers.SUBMIT_REQUEST, 12, PROMPT, GREEDY])
    assert harness.quiet_for(0.3)
    assert harness.server.suspended and harness.server.engine.suspended
    harness.send([Headers.RESUME])
    harness.send([Headers.UNPAUSE])
    assert _record(harness.message())["generated_tokens"] == expected
    assert not harness.server.engine.suspended


def test_streaming_and_abort(harness):
    params = {"top_k": 1, "num_tokens_to_generate": 60, "streaming_interval": 1}
    harness.send([Headers.SUBMIT_REQUEST, 13, PROMPT, params])
    first = harness.message()
    assert first[0] == Headers.PARTIAL_REPLY and first[1][0][0] == 13
    streamed = list(first[1][0][1])
    harness.send([Headers.ABORT, 13])
    while True:
        message = harness.message()
        if message[0] == Headers.PARTIAL_REPLY:
            streamed += message[1][0][1]
            continue
        request = _record(message)
        break
    assert request["status"] == "ABORTED" and request["finish_reason"] == "abort"
    assert 1 <= len(request["generated_tokens"]) < 60
    assert request["generated_tokens"][: len(streamed)] == streamed
    assert harness.server.engine.free_slots and not harness.server.engine.has_work


def test_stop_round_trip_ends_the_loop(model):
    h = Harness(model)
    h.send([Headers.STOP])
    assert h.message() == [Headers.STOP_ACK]
    assert h.thread.is_alive()  # waits for the coordinator's STOP_ACK
    h.send([Headers.STOP_ACK])
    h.thread.join(30)
    assert not h.thread.is_alive() and h.server.done
    h.close()


def test_poll_timeout_blocks_only_when_idle(model):
    from megatron_coord.engine.tp_broadcast import NewRequest
    from megatron_coord.sampling_params import SamplingParams

    engine = InferenceEngine(model, max_batch_size=1, max_seq_len=16)
    server = EngineServer(engine, single_process_state(), "tcp://127.0.0.1:9", idle_timeout_s=0.25)
    try:
        assert server.poll_timeout_ms() == 250  # idle: block on the socket
        engine.add_request(NewRequest(1, PROMPT, SamplingParams(**GREEDY), 0))
        assert server.poll_timeout_ms() == 0  # work: drain without blocking
        server.control.paused = True
        assert server.poll_timeout_ms() == 250  # work waits, but the replica is paused
        server.request_shutdown()
        assert server.poll_timeout_ms() == 0
    finally:
        server.link.socket.setsockopt(zmq.LINGER, 0)  # nobody listens: do not wait 2 s to deliver
        server.close()


def test_heartbeats_report_load(model):
    h = Harness(model)
    try:
        h.server.heartbeats.interval_s = 0.05
        h.send([Headers.SUBMIT_REQUEST, 21, PROMPT, {"top_k": 1, "num_tokens_to_generate": 3}])
        reports, finished = [], False
        while not finished or not reports or reports[-1]["generated_tokens"] < 3:
            message = h.message()
            if message[0] == Headers.HEARTBEAT:
                reports.append(message[1])
            else:
                finished = _record(message)["request_id"] == 21
        assert reports[-1]["data_parallel_rank"] == 0 and reports[-1]["active"] == 0
        assert reports[-1]["free_slots"] == 2 and reports[-1]["free_kv_tokens"] == 2 * 64
        assert reports[-1]["generated_tokens"] == 3 and not reports[-1]["paused"]
    finally:
        h.close()
