"""Weight updates inside a replica (TP=1, in process): the three modes and the staleness bound,
version spans of tokens and KV, no stale prefix-cache KV, SUSPEND/RESUME memory; then the
serving loop driven by a raw ROUTER with the contract's messages (UPDATE_WEIGHTS from a
checkpoint, a failing one, SET_GENERATION_EPOCH_OURS, SUSPEND with options)."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import zmq
from test_engine import hf_greedy, make_tiny_checkpoint

from megatron_coord.engine import InferenceEngine
from megatron_coord.engine.server import EngineServer
from megatron_coord.engine.tp_broadcast import NewRequest
from megatron_coord.models.checkpoint import load_model, load_weights
from megatron_coord.parallel_state import single_process_state
from megatron_coord.prefix_hash import block_hashes
from megatron_coord.protocol import Headers, decode, encode
from megatron_coord.sampling_params import SamplingParams

N = 12
SHARED = list(range(100, 140))  # 40 tokens: 2 full KV blocks of 16


@pytest.fixture(scope="module")
def new_checkpoint(tmp_path_factory) -> str:
    """The same tiny model with other weights (seed 1): the 'new policy'."""
    path = str(tmp_path_factory.mktemp("tiny-llama-v2"))
    make_tiny_checkpoint(path, seed=1)
    return path


@pytest.fixture(scope="module")
def new_model(new_checkpoint):
    return load_model(new_checkpoint, single_process_state())


def _engine(path: str, **kwargs) -> InferenceEngine:
    kwargs.setdefault("max_batch_size", 4)
    return InferenceEngine(load_model(path, single_process_state()), max_seq_len=96, **kwargs)


def _add(engine: InferenceEngine, rid: int, prompt: list[int], n: int = N) -> None:
    params = SamplingParams(top_k=1, num_tokens_to_generate=n, termination_id=-1)
    engine.add_request(NewRequest(rid, prompt, params, 0))


def _run(engine: InferenceEngine, records: dict | None = None) -> dict[int, dict]:
    records = {} if records is None else records
    while engine.has_work:
        for record in engine.step().finished:
            request = record["requests"][0]
            records[request["request_id"]] = request
    return records


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """What a fresh engine on ``model`` generates greedily (no stop token)."""
    engine = InferenceEngine(model, max_batch_size=1, max_seq_len=96)
    _add(engine, 0, prompt, n)
    return _run(engine)[0]["generated_tokens"]


def _midway(engine: InferenceEngine, steps: int = 4) -> dict[int, list[int]]:
    for _ in range(steps):
        engine.step()
    return {rid: list(r.generated) for rid, r in engine.active.items()}


PROMPTS = {1: [10, 20, 30], 2: SHARED + [7, 8], 3: SHARED + [9]}


def test_recompute_goes_on_as_the_new_weights_would(checkpoint, new_checkpoint, new_model):
    engine = _engine(checkpoint, max_batch_size=3)
    _add(engine, 0, SHARED, 1)
    _run(engine)  # SHARED's two blocks are cached: requests 2 and 3 share them below
    for rid, prompt in PROMPTS.items():
        _add(engine, rid, prompt)
    _add(engine, 4, [50, 60])  # waits for a slot: admitted after the update
    before = _midway(engine)
    assert engine.active[2].blocks[:2] == engine.active[3].blocks[:2]  # shared prefix blocks
    load_weights(engine.model, new_checkpoint)
    change = engine.change_version("v2", "recompute")
    assert (change.aborted, change.recomputed, change.finished) == (0, 3, [])
    records = _run(engine)
    for rid, prompt in PROMPTS.items():
        done = before[rid]
        g, request = len(done), records[rid]
        assert request["generated_tokens"][:g] == done
        assert request["generated_tokens"][g:] == _greedy(new_model, prompt + done, N - g)
        assert request["weight_version_spans"] == [[0, g, "initial"], [g, N, "v2"]]
        assert request["kv_version_spans"] == [[0, len(prompt) + N - 1, "v2"]]
    assert records[4]["generated_tokens"] == _greedy(new_model, [50, 60], N)
    assert records[4]["weight_version_spans"] == [[0, N, "v2"]]


def test_keep_spans_name_which_version_made_each_token(checkpoint, new_checkpoint):
    engine = _engine(checkpoint)
    _add(engine, 1, PROMPTS[1])
    before = _midway(engine)[1]
    g = len(before)
    load_weights(engine.model, new_checkpoint)
    assert engine.change_version("v2", "keep").recomputed == 0
    for _ in range(3):
        engine.step()
    assert engine.change_version("v3", "keep").aborted == 0  # a version bump, same weights
    request = _run(engine)[1]
    assert request["generated_tokens"][:g] == before
    assert request["weight_version_spans"] == [
        [0, g, "initial"],
        [g, g + 3, "v2"],
        [g + 3, N, "v3"],
    ]
    p = len(PROMPTS[1])  # token i was decoded over the KV of positions < p + i
    assert request["kv_version_spans"] == [
        [0, p + g - 1, "initial"],
        [p + g - 1, p + g + 2, "v2"],
        [p + g + 2, p + N - 1, "v3"],
    ]


def test_abort_ends_running_requests_with_their_tokens(checkpoint, new_checkpoint, new_model):
    engine = _engine(checkpoint, max_batch_size=1)
    _add(engine, 1, PROMPTS[1])
    _add(engine, 2, [50, 60])  # queued: not in flight on the weights yet
    before = _midway(engine)[1]
    load_weights(engine.model, new_checkpoint)
    change = engine.change_version("v2", "abort")
    (record,) = change.finished
    request = record["requests"][0]
    assert change.aborted == 1 and engine.num_requests == 1
    assert request["finish_reason"] == "aborted" and request["status"] == "ABORTED"
    assert request["generated_tokens"] == before
    assert request["weight_version_spans"] == [[0, len(before), "initial"]]
    queued = _run(engine)[2]
    assert queued["generated_tokens"] == _greedy(new_model, [50, 60], N)


def test_staleness_bound_aborts_only_requests_begun_on_old_versions(checkpoint):
    engine = _engine(checkpoint)
    _add(engine, 1, PROMPTS[1])
    engine.step()
    engine.change_version("v2", "keep")
    _add(engine, 2, [50, 60])
    engine.step()
    change = engine.change_version("v3", "keep", stale_versions=["initial"])
    assert change.aborted == 1
    assert change.finished[0]["requests"][0]["request_id"] == 1
    request = _run(engine)[2]
    assert request["finish_reason"] == "length"
    assert request["weight_version_spans"] == [[0, 1, "v2"], [1, N, "v3"]]


def test_a_prompt_cached_before_an_update_gets_the_new_weights(
    checkpoint, new_checkpoint, new_model
):
    engine = _engine(checkpoint)
    engine.blocks.record_events = True
    prompt = SHARED + [1, 2, 3]
    _add(engine, 1, prompt)
    old = _run(engine)[1]
    assert engine.blocks.drain_events()["kv_blocks_stored"][:2] == block_hashes(SHARED, 16)
    _add(engine, 2, prompt)
    assert _run(engine)[2]["cached_tokens"] == 32  # the cache works
    load_weights(engine.model, new_checkpoint)
    engine.change_version("v2", "keep")
    assert engine.blocks.cached == 0
    assert engine.blocks.drain_events() == {"kv_blocks_reset": True, "kv_blocks_stored": []}
    _add(engine, 3, prompt)
    first = _run(engine)[3]
    expected = _greedy(new_model, prompt, N)
    assert first["cached_tokens"] == 0 and first["generated_tokens"] == expected != old
    _add(engine, 4, prompt)
    again = _run(engine)[4]  # the new version's blocks are reused
    assert again["cached_tokens"] == 32 and again["generated_tokens"] == expected
    # Reported under the names the coordinator computes (version-free).
    assert engine.blocks.drain_events()["kv_blocks_stored"][:2] == block_hashes(SHARED, 16)


def test_suspend_frees_the_kv_cache_and_resume_goes_on(checkpoint, model, new_checkpoint):
    engine = _engine(checkpoint)
    _add(engine, 1, PROMPTS[1])
    before = _midway(engine)[1]
    held = engine.kv_bytes
    weights = engine.weight_bytes
    probe = weakref.ref(engine.kv_cache.k[0])
    engine.suspend(offload_weights=True)  # on CPU the weights are in CPU memory already
    gc.collect()
    assert engine.kv_bytes == 0 and probe() is None and held > 0
    assert not engine.weights_offloaded and engine.weight_bytes == weights
    engine.resume()
    assert engine.kv_bytes == held
    request = _run(engine)[1]
    assert request["generated_tokens"] == _greedy(model, PROMPTS[1], N)
    assert request["generated_tokens"][: len(before)] == before
    assert request["kv_version_spans"] == [[0, len(PROMPTS[1]) + N - 1, "initial"]]


def test_an_update_while_suspended_recomputes_on_resume(checkpoint, new_checkpoint, new_model):
    engine = _engine(checkpoint)
    _add(engine, 1, PROMPTS[1])
    done = _midway(engine)[1]
    engine.suspend()
    load_weights(engine.model, new_checkpoint)
    assert engine.change_version("v2", "recompute").recomputed == 1
    engine.resume()
    request = _run(engine)[1]
    g = len(done)
    assert request["generated_tokens"][g:] == _greedy(new_model, PROMPTS[1] + done, N - g)


# ---- the serving loop, driven by a raw ROUTER -----------------------------------------------


class Router:
    """A ROUTER standing in for the coordinator, and an EngineServer looping in a thread; the
    engine's heartbeats are answered and kept apart (``last_load``)."""

    def __init__(self, model) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        engine = InferenceEngine(model, max_batch_size=2, max_seq_len=96, weight_version="v1")
        self.server = EngineServer(
            engine,
            single_process_state(),
            f"tcp://127.0.0.1:{port}",
            idle_timeout_s=0.05,
            heartbeat_interval_s=0.05,
        )
        self.identity, frame = self.router.recv_multipart()
        self.registration = decode(frame)
        self.last_load: dict = {}
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def send(self, *message) -> None:
        self.router.send_multipart([self.identity, encode(list(message))])

    def message(self, timeout_s: float = 60.0) -> list:
        """The next message that is not a heartbeat."""
        deadline = time.monotonic() + timeout_s
        while self.router.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            message = decode(self.router.recv_multipart()[1])
            if message[0] != Headers.HEARTBEAT:
                return message
            self.last_load = message[1]
        raise TimeoutError("no message from the engine")

    def load(self, predicate, timeout_s: float = 30.0) -> dict:
        """The first heartbeat report (from now) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.router.poll(100):
                message = decode(self.router.recv_multipart()[1])
                assert message[0] == Headers.HEARTBEAT, message
                if predicate(message[1]):
                    return message[1]
        raise TimeoutError(f"no such heartbeat; last {self.last_load}")

    def generate(self, rid: int, prompt: list[int], n: int = 6) -> dict:
        self.send(Headers.SUBMIT_REQUEST, rid, prompt, {"top_k": 1, "num_tokens_to_generate": n})
        message = self.message()
        assert message[0] == Headers.ENGINE_REPLY, message
        return message[1][0]["requests"][0]

    def close(self) -> None:
        self.server.request_shutdown()
        self.thread.join(30)
        self.server.close()
        self.router.close(0)
        self.context.term()


@pytest.fixture
def router(checkpoint):
    r = Router(load_model(checkpoint, single_process_state()))
    yield r
    r.close()


def _update(version: str, source: dict, mode: str = "keep") -> dict:
    spec = {"version": version, "source": source, "mode": mode, "abort_older_than": None}
    spec.update(timeout_s=30.0, stale_versions=[])
    return spec


def test_update_from_a_checkpoint_through_the_socket(router, checkpoint, new_checkpoint):
    assert router.registration[1]["weight_version"] == "v1"
    assert router.registration[1]["tensor_parallel_size"] == 1
    prompt = [10, 20, 30]
    params = {"top_k": 1, "num_tokens_to_generate": 40, "streaming_interval": 1}
    params["termination_id"] = -1
    router.send(Headers.SUBMIT_REQUEST, 5, prompt, params)
    partial = router.message()
    assert partial[0] == Headers.PARTIAL_REPLY
    assert partial[1][0][2]["weight_version_spans"] == [[0, 1, "v1"]]
    source = {"kind": "checkpoint", "path": new_checkpoint}
    router.send(Headers.UPDATE_WEIGHTS, 3, _update("v2", source, "recompute"))
    partials = []
    while (message := router.message())[0] == Headers.PARTIAL_REPLY:
        partials.append(message)
    assert message[0] == Headers.UPDATE_WEIGHTS_DONE and message[1] == 3, message
    result = message[2]
    assert result["ok"] and result["version"] == "v2" and result["error"] is None, result
    assert result["recomputed"] == 1 and result["aborted"] == 0
    assert result["weight_bytes"] == router.server.engine.weight_bytes > 0
    while (message := router.message())[0] == Headers.PARTIAL_REPLY:
        partials.append(message)
    request = message[1][0]["requests"][0]
    spans = request["weight_version_spans"]
    assert [s[2] for s in spans] == ["v1", "v2"] and spans[-1][1] == 40
    assert request["kv_version_spans"] == [[0, len(prompt) + 39, "v2"]]
    streamed = 1 + sum(len(p[1][0][1]) for p in partials)  # the last token is in the record
    g = spans[0][1]
    assert partials[-1][1][0][2]["weight_version_spans"] == [[0, g, "v1"], [g, streamed, "v2"]]
    expected = hf_greedy(new_checkpoint, [[7, 8, 9]], 6)[0]
    assert router.generate(6, [7, 8, 9])["generated_tokens"] == expected
    assert router.load(lambda load: load["weight_version"] == "v2")["healthy"]


def test_a_refused_checkpoint_leaves_the_replica_serving(router, checkpoint, tmp_path):
    from _model_scenario import save_hf_checkpoint

    other = str(tmp_path / "other")
    save_hf_checkpoint(other, seed=1, tie=False)  # another architecture altogether
    errors = []
    for update_id, path in ((1, other), (2, str(tmp_path / "nothing"))):
        source = {"kind": "checkpoint", "path": path}
        router.send(Headers.UPDATE_WEIGHTS, update_id, _update("v2", source))
        done = router.message()
        assert done[0] == Headers.UPDATE_WEIGHTS_DONE and done[1] == update_id
        assert not done[2]["ok"] and done[2]["version"] == "v1"
        errors.append(done[2]["error"])
    assert "differs from the served model's in vocab_size (101, served 50257)" in errors[0]
    assert "no config.json" in errors[1]
    expected = hf_greedy(checkpoint, [[7, 8, 9]], 6)[0]
    request = router.generate(7, [7, 8, 9])
    assert request["generated_tokens"] == expected
    assert request["weight_version_spans"] == [[0, len(expected), "v1"]]
    assert router.server.engine.weights_broken is None


def test_generation_epoch_and_suspend_with_options(router):
    router.send(Headers.SET_GENERATION_EPOCH_OURS, 7)
    request = router.generate(8, [7, 8, 9])
    assert request["weight_version_spans"] == [[0, len(request["generated_tokens"]), "7"]]
    held = router.load(lambda load: load["weight_version"] == "7")["kv_bytes"]
    assert held > 0
    router.send(Headers.SUSPEND, {"offload_weights": True})
    load = router.load(lambda load: load["suspended"])
    assert load["kv_bytes"] == 0 and load["weight_bytes"] > 0 and not load["weights_offloaded"]
    assert load["kv_blocks_reset"]
    router.send(Headers.RESUME)
    assert router.load(lambda load: not load["suspended"])["kv_bytes"] == held
    assert router.generate(9, [7, 8, 9])["generated_tokens"] == request["generated_tokens"]


def test_a_replica_broken_by_a_failed_update_waits_for_the_next(router, new_checkpoint):
    engine = router.server.engine
    engine.weights_broken = "the update to 'v2' failed midway: (a test)"  # weights mixed
    router.send(Headers.SUBMIT_REQUEST, 20, [7, 8, 9], {"top_k": 1, "num_tokens_to_generate": 6})
    load = router.load(lambda load: load["queued"] == 1)
    assert load["update_error"] == engine.weights_broken and not load["healthy"]
    with pytest.raises(TimeoutError):
        router.message(timeout_s=0.3)  # held: no step runs on mixed weights
    router.send(Headers.ABORT, 20)  # the coordinator moves its requests elsewhere
    aborted = router.message()[1][0]["requests"][0]
    assert aborted["request_id"] == 20 and aborted["finish_reason"] == "abort"
    router.send(Headers.SUBMIT_REQUEST, 21, [7, 8, 9], {"top_k": 1, "num_tokens_to_generate": 6})
    source = {"kind": "checkpoint", "path": new_checkpoint}
    router.send(Headers.UPDATE_WEIGHTS, 4, _update("v3", source))
    done = router.message()
    assert done[0] == Headers.UPDATE_WEIGHTS_DONE and done[2]["ok"], done
    request = router.message()[1][0]["requests"][0]
    assert request["generated_tokens"] == hf_greedy(new_checkpoint, [[7, 8, 9]], 6)[0]
    assert engine.weights_broken is None
    assert router.load(lambda load: load["weight_version"] == "v3")["healthy"]
