"""A real TP=2 replica (torchrun, gloo) joined to a raw ROUTER speaking the contract's messages:
a trainer in this process sends new weights over torch.distributed while requests are in
flight (recompute: the tokens after the update are the new weights'), then a checkpoint update
under keep (the spans name each token's version), a 0.19 generation epoch, and SUSPEND with
options; each rank of the replica applies every update at the same step boundary."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid

import pytest
import zmq
from _procs import launch_env, torchrun
from test_engine import make_tiny_checkpoint

from megatron_coord.protocol import Headers, decode, encode

pytestmark = pytest.mark.torchrun

N = 90
PROMPTS = [[10, 20, 30], [5, 6, 7, 8], [40, 41, 42], [3, 1, 4, 1, 5]]
PARAMS = {"top_k": 1, "num_tokens_to_generate": N, "termination_id": -1, "streaming_interval": 1}


class Coordinator:
    """The ROUTER a joined replica registers with; answers its heartbeats, sorts the rest."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.identity = None
        self.load: dict = {}
        self.records: dict[int, dict] = {}

    def send(self, *message) -> None:
        self.router.send_multipart([self.identity, encode(list(message))])

    def _recv(self) -> list | None:
        """One message: heartbeats answered, partials counted and records kept (None), the
        rest returned."""
        identity, frame = self.router.recv_multipart()
        message = decode(frame)
        if message[0] == Headers.REGISTER:
            self.identity = identity
            self.send(Headers.HEARTBEAT, {})  # answered: joined
            return message
        if message[0] == Headers.HEARTBEAT:
            self.load = message[1]
            self.send(Headers.HEARTBEAT, {})
        elif message[0] == Headers.PARTIAL_REPLY:
            for item in message[1]:
                self.records.setdefault(item[0], {"partials": 0})["partials"] += 1
        elif message[0] == Headers.ENGINE_REPLY:
            for record in message[1]:
                request = record["requests"][0]
                self.records[request["request_id"]] = request
        else:
            return message
        return None

    def next(self, timeout_s: float = 120.0) -> list:
        """The next message that is not a heartbeat, a partial reply or a record."""
        deadline = time.monotonic() + timeout_s
        while self.router.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            message = self._recv()
            if message is not None:
                return message
        raise TimeoutError("nothing from the replica")

    def wait(self, predicate, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, what
            if self.router.poll(50) and (message := self._recv()) is not None:
                raise AssertionError(f"unexpected {message} while waiting for {what}")

    def submit(self, first_id: int) -> list[int]:
        ids = list(range(first_id, first_id + len(PROMPTS)))
        for rid, prompt in zip(ids, PROMPTS, strict=True):
            self.send(Headers.SUBMIT_REQUEST, rid, prompt, PARAMS)
        self.wait(lambda: all(rid in self.records for rid in ids), "their first tokens")
        return ids

    def finished(self, ids: list[int]) -> list[dict]:
        self.wait(lambda: all("generated_tokens" in self.records.get(r, {}) for r in ids), "ends")
        return [self.records[rid] for rid in ids]

    def close(self) -> None:
        self.router.close(0)
        self.context.term()


def _update(update_id: int, version: str, source: dict, mode: str) -> list:
    spec = {"version": version, "source": source, "mode": mode, "abort_older_than": None}
    spec.update(timeout_s=60.0, stale_versions=[], first_rank=1, world_size=3)
    return [Headers.UPDATE_WEIGHTS, update_id, spec]


def _references(path: str) -> tuple:
    """Greedy continuations on ``path``'s weights, from a TP=1 engine in this process."""
    from test_weight_updates import _greedy

    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.parallel_state import single_process_state

    model = load_model(path, single_process_state())
    return lambda prompt, n: _greedy(model, prompt, n)


def test_tp2_replica_updates_while_serving(tmp_path, checkpoint):
    from safetensors.torch import load_file

    from megatron_coord.weights import WeightSender

    new = str(tmp_path / "new")
    make_tiny_checkpoint(new, seed=1)
    old_greedy, new_greedy = _references(checkpoint), _references(new)
    coordinator = Coordinator()
    args = ["--model", checkpoint, "--tensor-parallel-size", "2", "--weights-version", "v1"]
    args += ["--coordinator-address", f"tcp://127.0.0.1:{coordinator.port}"]
    args += ["--heartbeat-interval", "0.2", "--max-seq-len", "100"]
    # This stand-in is one thread: while it computes reference tokens it answers nothing, for
    # over 10 s (the default) on a loaded host, and the replica would rightly register again.
    args += ["--coordinator-timeout", "120"]
    env = launch_env(uuid.uuid4().hex, tmp_path)
    launch = subprocess.Popen(
        torchrun(2, "serve.py", *args), env=env, stdout=subprocess.DEVNULL, text=True
    )
    try:
        register = coordinator.next()
        assert register[1]["weight_version"] == "v1"
        assert register[1]["tensor_parallel_size"] == 2

        # 1. From a trainer over torch.distributed, recompute, requests in flight.
        ids = coordinator.submit(100)
        sender = WeightSender(bucket_bytes=1 << 20, timeout_s=60)
        tensors = load_file(os.path.join(new, "model.safetensors"))
        sent: dict = {}
        trainer = threading.Thread(target=lambda: sent.update(sender.send(tensors.items(), 3)))
        coordinator.send(*_update(1, "v2", sender.source_spec(), "recompute"))
        trainer.start()
        done = coordinator.next()
        trainer.join(60)
        assert done[:2] == [Headers.UPDATE_WEIGHTS_DONE, 1] and done[2]["ok"], done
        assert done[2]["version"] == "v2" and sent["version"] == "v2"
        assert done[2]["buffer_bytes"] <= 1 << 20 < sent["bytes"]
        recomputed = 0
        for prompt, request in zip(PROMPTS, coordinator.finished(ids), strict=True):
            tokens, spans = request["generated_tokens"], request["weight_version_spans"]
            g = spans[0][1] if spans[0][2] == "v1" else 0
            assert tokens[:g] == old_greedy(prompt, g)
            assert tokens[g:] == new_greedy(prompt + tokens[:g], N - g), g
            if 0 < g < N:
                recomputed += 1
                assert spans == [[0, g, "v1"], [g, N, "v2"]]
                assert request["kv_version_spans"] == [[0, len(prompt) + N - 1, "v2"]]
        assert recomputed == done[2]["recomputed"] > 0

        # 2. From a checkpoint (back to the first weights), keep.
        ids = coordinator.submit(200)
        coordinator.send(*_update(2, "v3", {"kind": "checkpoint", "path": checkpoint}, "keep"))
        done = coordinator.next()
        assert done[2]["ok"] and done[2]["version"] == "v3", done
        for prompt, request in zip(PROMPTS, coordinator.finished(ids), strict=True):
            spans = request["weight_version_spans"]
            g = spans[0][1]
            assert request["generated_tokens"][:g] == new_greedy(prompt, g)
            if g < N:
                p = len(prompt)
                assert spans == [[0, g, "v2"], [g, N, "v3"]]
                kv = [[0, p + g - 1, "v2"], [p + g - 1, p + N - 1, "v3"]]
                assert request["kv_version_spans"] == kv
        coordinator.send(Headers.SUBMIT_REQUEST, 300, PROMPTS[0], PARAMS)
        (request,) = coordinator.finished([300])
        assert request["generated_tokens"] == old_greedy(PROMPTS[0], N)

        # 3. A Megatron 0.19 generation epoch; SUSPEND with options, RESUME.
        coordinator.send(Headers.SET_GENERATION_EPOCH_OURS, 9)
        coordinator.send(Headers.SUBMIT_REQUEST, 301, PROMPTS[1], PARAMS)
        (request,) = coordinator.finished([301])
        assert request["weight_version_spans"] == [[0, N, "9"]]
        held = coordinator.load["kv_bytes"]
        coordinator.send(Headers.SUSPEND, {"offload_weights": True})
        coordinator.wait(lambda: coordinator.load.get("kv_bytes") == 0, "the KV cache freed")
        coordinator.send(Headers.RESUME)
        coordinator.wait(lambda: coordinator.load.get("kv_bytes") == held, "the KV cache back")
        assert coordinator.load["weight_version"] == "9"

        coordinator.send(Headers.STOP)
        assert coordinator.next() == [Headers.STOP_ACK]
        coordinator.send(Headers.STOP_ACK)
        assert launch.wait(timeout=60) == 0
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
        coordinator.close()
