"""An instant engine that speaks Megatron-core 0.19's engine protocol, built from its own classes.

Run under ``megatron019.environment()`` (0.19 first on the path). Like 0.19's
``DynamicInferenceEngine`` it registers with one empty frame from identity ``mp-coord-<rank>``,
takes ``[20, request_id, prompt, sampling_params]``, and answers each wake-up's requests with one
``[21, [record.merge().serialize(), ...]]`` of real ``DynamicInferenceRequestRecord``s. The
"generation" is fake_engine's echo of the prompt, so tests can predict every token.

Control signals follow 0.19's engine: PAUSE holds new requests until UNPAUSE; each signal
asserts the state 0.19's engine asserts (an invalid one ends the process with status 3, so a
test sees a coordinator that sent one); STOP, or SIGTERM, sends DISCONNECT ``[60]`` and exits 0. Any header
0.19 does not know raises ``UnknownHeaderError`` (status 3 too), as 0.19's engine does.

``--template``: serialize one record per distinct request shape with the real classes, then
only change its id (the benchmark's instant engine: the classes cost more than the coordinator).

Run: ``python -m megatron_coord.testing.fake_engine_019 tcp://127.0.0.1:PORT --rank 0
[--ranks N] [--template]``.
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import threading
from typing import Any

import msgpack
import msgspec
import torch
import zmq
from megatron.core.inference.headers import Headers, UnknownHeaderError
from megatron.core.inference.inference_request import (
    DynamicInferenceRequest,
    DynamicInferenceRequestRecord,
    Status,
)
from megatron.core.inference.sampling_params import SamplingParams

from .fake_engine import _generate, recv_ready

_encode = msgspec.msgpack.Encoder().encode
_TRANSITIONS = {  # signal -> (states it is valid in, the state it leads to): 0.19's engine
    Headers.PAUSE: (None, "paused"),  # valid anywhere; a no-op unless running
    Headers.UNPAUSE: ({"paused"}, "running"),
    Headers.SUSPEND: ({"paused"}, "suspended"),
    Headers.RESUME: ({"suspended"}, "paused"),
    Headers.STOP: ({"paused", "suspended"}, "stopping"),
}


class Engine019:
    """One data-parallel rank of 0.19's protocol that answers at once."""

    def __init__(self, address: str, rank: int, template: bool = False) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, f"mp-coord-{rank}".encode())
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(address)
        self.state = "running"
        self.held: list[list[Any]] = []
        self.template = template
        self._templates: dict[bytes, dict[str, Any]] = {}
        self.epoch: int | None = None
        self.terminated = False  # SIGTERM: the loop ends after this wake-up; then DISCONNECT

    def record(self, request_id: int, prompt: Any, params: dict[str, Any]) -> dict[str, Any]:
        """The merged, serialized record 0.19's engine sends for a finished request."""
        if self.template:
            key = msgpack.packb([prompt, params])
            cached = self._templates.get(key)
            if cached is None:
                cached = self._templates[key] = self._build(request_id, prompt, params)
            record = copy.copy(cached)
            record["request_id"] = request_id
            return record
        return self._build(request_id, prompt, params)

    def _build(self, request_id: int, prompt: Any, params: dict[str, Any]) -> dict[str, Any]:
        tokens = list(prompt.encode("utf-8")) if isinstance(prompt, str) else prompt
        sampling = SamplingParams.deserialize(params)
        request = DynamicInferenceRequest(
            request_id=request_id,
            prompt_tokens=torch.tensor(tokens, dtype=torch.int64),
            sampling_params=sampling,
        )
        request.generated_tokens = _generate(tokens, sampling.num_tokens_to_generate or 0)
        request.status = Status.COMPLETED
        request.policy_epoch = None if self.epoch is None else [(0, self.epoch)]
        return DynamicInferenceRequestRecord.from_request(request).merge().serialize()

    def control(self, header: Headers) -> None:
        """Apply a control signal as 0.19's engine does, asserting its state."""
        valid_in, new_state = _TRANSITIONS[header]
        if valid_in is None:
            if self.state == "running":
                self.state = new_state
            return
        assert self.state in valid_in, f"Received {header.name} in state {self.state}"
        self.state = new_state

    def serve(self) -> int:
        """Register, then answer until STOP (0) or an invalid message (3)."""
        sock = self.socket
        sock.send(b"")
        try:
            while self.state != "stopping" and not self.terminated:
                submits = []
                if not sock.poll(100):
                    continue
                for raw in recv_ready(sock):
                    data = msgpack.unpackb(raw, raw=False)
                    header = Headers(data[0])  # UnknownHeaderError, as 0.19's engine
                    if header == Headers.SUBMIT_REQUEST:
                        (self.held if self.state != "running" else submits).append(data[1:4])
                    elif header == Headers.SET_GENERATION_EPOCH:
                        self.epoch = data[1]
                    elif header in _TRANSITIONS:
                        self.control(header)
                        if self.state == "running":
                            submits, self.held = submits + self.held, []
                    else:
                        raise UnknownHeaderError(header)
                if submits:  # the same msgpack as 0.19's engine sends, encoded faster
                    records = [self.record(*s) for s in submits]
                    sock.send(_encode([Headers.ENGINE_REPLY.value, records]))
            sock.send(msgpack.packb([Headers.DISCONNECT.value]))
            return 0
        except (AssertionError, UnknownHeaderError, ValueError) as exc:
            print(f"0.19 engine: {exc!r}", file=sys.stderr, flush=True)
            return 3
        finally:
            sock.close()
            self.context.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="serve ranks RANK.. RANK+N-1, a thread each (tests: "
        "importing 0.19 takes seconds per process); the exit status is the worst one's",
    )
    parser.add_argument("--template", action="store_true", help="reuse serialized records")
    args = parser.parse_args(argv)
    engines = [Engine019(args.address, args.rank + i, args.template) for i in range(args.ranks)]
    statuses = [0] * len(engines)

    def terminate(signum: int, frame: Any) -> None:
        for engine in engines:
            engine.terminated = True

    signal.signal(signal.SIGTERM, terminate)

    def serve(index: int) -> None:
        statuses[index] = engines[index].serve()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sys.exit(max(statuses))


if __name__ == "__main__":
    main()
