"""An instant engine for tests and benchmarks: a real process that speaks the engine protocol.

It registers (ours: ``[REGISTER, {...}]``; ``--megatron``: one empty frame from identity
``mp-coord-<rank>``, as Megatron-core 0.16's engines do), then on each wake-up drains every
ready message and answers all drained SUBMIT_REQUESTs with ONE ENGINE_REPLY. The "generation"
echoes the prompt: ``generated_tokens[i] = prompt_tokens[i % len(prompt_tokens)]`` for
``num_tokens_to_generate`` tokens, so tests can predict every token and text. It ends early, as
an engine does, at ``termination_id`` (unless ``ignore_eos``) or a ``stop_token_ids`` token (the
token included, finish_reason "stop"); before ``min_tokens`` such a token is masked: the echo
takes the next id instead (``(t + 1) % 256``).

Asked for log-probabilities, it reports those of a fake model (``fake_log_prob``, ``fake_top_n``:
every token it echoes is that model's likeliest, the alternatives follow it) for the generated
tokens, the prompt (``prompt_log_probs``, with ``skip_prompt_log_probs`` False) and the top-N
lists of both (``top_n_logprobs``, ``return_prompt_top_n_logprobs``), as the contract of
issue 23 says. ``cached_tokens`` comes from a fake prefix cache (see fake_model.py).

PAUSE is acked and holds new requests until UNPAUSE; STOP is acked and the process exits after
the coordinator's STOP_ACK. Requests with ``streaming_interval`` > 0 get one PARTIAL_REPLY per
generated token before their final record. ``ByteTokenizer`` (UTF-8 bytes as token ids) is a
picklable tokenizer for coordinators spawned in tests and benchmarks.

``SteppedFakeEngine`` (``--step-time A,B``) is the same engine with a step-time model, for
routing benchmarks and fault tests: continuous batching of at most ``--max-batch-size``
requests, one token per request per step, a step that really sleeps ``A + B * batch_tokens``
seconds (batch tokens: prompt tokens prefilled in the step + one per decoding request), aborts
that free the slot, and HEARTBEAT load reports (``processed_tokens`` as the real engine server
sends them). Like a real replica it keeps the liveness contract (REGISTER says its interval,
REGISTER_ACK sets the cadence), keeps a request sent again that it holds, and, declared dead
while it lived (SIGSTOP it), registers again with what it holds (replica_rejoin.py).

Run: ``python -m megatron_coord.testing.fake_engine tcp://127.0.0.1:PORT --rank 0 [--megatron]
[--step-time A,B --max-batch-size N --heartbeat S]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import msgspec
import zmq

from ..protocol import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Headers
from ..replica_rejoin import Answer, Rejoin
from .fake_model import FakePrefixCache, generate_until_stop, log_prob_fields
from .fake_model import echo as _generate

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode

# DynamicInferenceRequest's fields in Megatron-core 0.16 (its client rebuilds the record with
# cls(**obj), so a Megatron-style record must carry exactly these keys).
_MEGATRON_REQUEST_FIELDS = [
    "request_id",
    "prompt",
    "sampling_params",
    "inference_parameters",
    "prompt_tokens",
    "arrival_time",
    "status",
    "encoder_prompt",
    "generated_text",
    "segments",
    "generated_segments",
    "generated_sequence_lengths",
    "generated_tokens",
    "prompt_log_probs",
    "generated_log_probs",
    "prompt_top_n_logprobs",
    "generated_top_n_logprobs",
    "generated_length",
    "tpot",
    "remaining_prompt_tokens",
    "latency",
    "finished_chunk_token_count",
    "stop_word_ids",
    "events",
]
_EMPTY_MEGATRON_REQUEST = dict.fromkeys(_MEGATRON_REQUEST_FIELDS)


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): picklable, instant, and multi-byte aware."""

    vocab_size = 256
    eod = 0

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def detokenize(self, token_ids: list[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")


def recv_ready(sock: zmq.Socket, block: bool = True) -> list[bytes]:
    """Every message already queued on ``sock`` (after waiting for the first if ``block``), so
    a batch of requests is handled, and answered, together."""
    messages = [sock.recv()] if block else []
    try:
        while True:
            messages.append(sock.recv(zmq.NOBLOCK))
    except zmq.Again:
        pass
    return messages


class FakeEngine:
    """One data-parallel rank that answers instantly (see the module docstring)."""

    def __init__(
        self,
        address: str,
        data_parallel_rank: int,
        megatron_style: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        identity: bytes | None = None,
    ) -> None:
        self.rank = data_parallel_rank
        self.megatron_style = megatron_style
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        if megatron_style:
            identity = f"mp-coord-{data_parallel_rank}".encode()
        if identity is not None:
            self.socket.setsockopt(zmq.IDENTITY, identity)
        self.identity = identity
        self.socket.connect(address)
        self.paused = False
        self.stopping = False
        self.held: list[list[Any]] = []  # submits that arrived while paused
        self.served = 0
        self.prefix_cache = FakePrefixCache()

    def register(self) -> None:
        if self.megatron_style:
            self.socket.send(b"")
        else:
            info = {"data_parallel_rank": self.rank, "protocol": PROTOCOL_VERSION}
            self.socket.send(_encode([int(Headers.REGISTER), info]))

    def record(self, request_id: int, prompt: Any, sampling: dict[str, Any]) -> dict[str, Any]:
        """The finished record of one request, shaped like Megatron's serialize()."""
        tokens = list(prompt.encode("utf-8")) if isinstance(prompt, str) else prompt
        generated, reason = generate_until_stop(tokens, sampling)
        request = dict(_EMPTY_MEGATRON_REQUEST)
        request.update(
            request_id=request_id,
            sampling_params=sampling,
            prompt_tokens=["tensor", tokens],
            status="COMPLETED",
            generated_tokens=generated,
            generated_length=len(generated),
            finished_chunk_token_count=0,
            events=[],
        )
        if sampling.get("return_log_probs") or sampling.get("top_n_logprobs", 0) > 0:
            request.update(log_prob_fields(tokens, generated, sampling))
        if not self.megatron_style:
            request["data_parallel_rank"] = self.rank  # extra keys must pass through
            request["finish_reason"] = reason
            wants_prompt = sampling.get("return_log_probs") and not sampling.get(
                "skip_prompt_log_probs"
            )
            request["cached_tokens"] = self.prefix_cache.lookup_and_add(tokens, not wants_prompt)
        return {"requests": [request], "latency": None}

    def answer(self, submits: list[list[Any]]) -> None:
        """Stream tokens where asked, then send every finished record in one ENGINE_REPLY."""
        streaming = [s for s in submits if s[2].get("streaming_interval", 0) > 0]
        records = [self.record(*s) for s in submits]
        if streaming:
            by_id = {r["requests"][0]["request_id"]: r["requests"][0] for r in records}
            longest = max(len(by_id[s[0]]["generated_tokens"]) for s in streaming)
            for step in range(longest):
                items = [
                    [s[0], [by_id[s[0]]["generated_tokens"][step]]]
                    for s in streaming
                    if step < len(by_id[s[0]]["generated_tokens"])
                ]
                self.socket.send(_encode([int(Headers.PARTIAL_REPLY), items]))
        self.socket.send(_encode([int(Headers.ENGINE_REPLY), records]))
        self.served += len(records)

    def handle(self, message: list[Any], submits: list[list[Any]]) -> bool:
        """Act on one message; False once the coordinator confirmed STOP."""
        header = message[0]
        if header == Headers.SUBMIT_REQUEST:
            (self.held if self.paused else submits).append(message[1:4])
        elif header == Headers.PAUSE:
            self.paused = True
            self.socket.send(_encode([int(Headers.PAUSE_ACK)]))
        elif header == Headers.UNPAUSE:
            self.paused = False
            submits.extend(self.held)
            self.held = []
        elif header == Headers.STOP:
            self.socket.send(_encode([int(Headers.STOP_ACK)]))
        elif header == Headers.STOP_ACK:
            return False
        elif header == Headers.UPDATE_WEIGHTS:  # applied at once (a fake has no weights)
            result = {"ok": True, "version": message[2].get("version"), "error": None}
            self.socket.send(_encode([int(Headers.UPDATE_WEIGHTS_DONE), message[1], result]))
        elif header == Headers.ABORT:
            for index, held in enumerate(self.held):
                if held[0] == message[1]:
                    del self.held[index]
                    record = self.record(*held)
                    record["requests"][0]["status"] = "ABORTED"
                    self.socket.send(_encode([int(Headers.ENGINE_REPLY), [record]]))
                    break
        return True

    def serve(self) -> None:
        """Register, then answer until STOP_ACK."""
        self.register()
        sock = self.socket
        running = True
        while running:
            submits: list[list[Any]] = []
            for raw in recv_ready(sock):
                if not self.handle(_decode(raw), submits):
                    running = False
            if submits:
                self.answer(submits)
        sock.close()
        self.context.term()


class _Sequence:
    """One request inside a SteppedFakeEngine."""

    __slots__ = ("request_id", "prompt", "sampling", "budget", "generated", "streamed", "since")

    def __init__(self, request_id: int, prompt: list[int], sampling: dict[str, Any]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.sampling = sampling
        self.budget = sampling.get("num_tokens_to_generate", 30)
        self.generated = 0
        self.streamed = 0
        self.since = 0  # steps since the last partial reply


class SteppedFakeEngine(FakeEngine):
    """A FakeEngine whose requests take time: see the module docstring's step-time model."""

    def __init__(
        self,
        address: str,
        data_parallel_rank: int,
        step_time: tuple[float, float] = (0.002, 0.0001),
        max_batch_size: int = 16,
        heartbeat_interval_s: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not kwargs.get("megatron_style"):  # its own, so it is still itself after a pause
            kwargs.setdefault(
                "identity", b"fake-%d-%s" % (data_parallel_rank, os.urandom(4).hex().encode())
            )
        super().__init__(address, data_parallel_rank, **kwargs)
        if max_batch_size < 1 or min(step_time) < 0 or heartbeat_interval_s <= 0:
            raise ValueError("bad step-time model")
        self.step_time = step_time
        self.max_batch_size = max_batch_size
        self.heartbeat_interval_s = heartbeat_interval_s
        self.waiting: list[_Sequence] = []
        self.active: list[_Sequence] = []
        self.processed_tokens = 0
        self.steps = 0
        self._next_heartbeat = 0.0
        self.rejoin = Rejoin()
        self._registered_at = 0.0
        self._not_known = False  # answered not_connected: declared dead while it lived

    def register(self, fields: dict[str, Any] | None = None) -> None:
        """REGISTER with its heartbeat interval (the coordinator answers the cadence)."""
        if self.megatron_style:
            super().register()
            return
        info = {"data_parallel_rank": self.rank, "protocol": PROTOCOL_VERSION}
        info.update(heartbeat_interval=self.heartbeat_interval_s, heartbeat_interval_fixed=False)
        self.socket.send(_encode([int(Headers.REGISTER), {**info, **(fields or {})}]))
        self._registered_at = time.monotonic()

    def answer(self, submits: list[list[Any]]) -> None:
        """Queue the submits (answered as steps complete them); one it holds is kept."""
        held = {s.request_id for s in self.waiting + self.active}
        for request_id, prompt, sampling in submits:
            if request_id in held:
                continue
            tokens = list(prompt.encode("utf-8")) if isinstance(prompt, str) else prompt
            self.waiting.append(_Sequence(request_id, tokens, sampling))

    def handle(self, message: list[Any], submits: list[list[Any]]) -> bool:
        header = message[0]
        if header == Headers.ABORT:
            self.abort(message[1])
        elif header == Headers.REGISTER_ACK:
            self._on_register_ack(message[1])
        elif header == Headers.ERROR and message[2] == "not_connected":
            self._not_known = True  # registers again once this drain's submits are queued
        return super().handle(message, submits)

    def _register_again(self) -> None:
        """Declared dead while it lived: register again (on the same socket), listing what it
        holds; their outputs wait for the answer. At most once a second."""
        self._not_known = False
        if time.monotonic() - self._registered_at < 1.0:
            return
        holding = [s.request_id for s in self.waiting + self.active]
        self.register(self.rejoin.fields(holding, self.identity))

    def _on_register_ack(self, ack: dict[str, Any]) -> None:
        """The cadence to beat at; after a re-registration, what to drop and what to keep."""
        if ack.get("heartbeat_interval"):
            self.heartbeat_interval_s = ack["heartbeat_interval"]
            self._next_heartbeat = min(
                self._next_heartbeat, time.monotonic() + ack["heartbeat_interval"]
            )
        answer = self.rejoin.answered(ack)
        if answer is not None:
            self._carry_on(answer)

    def _carry_on(self, answer: Answer) -> None:
        """Drop silently what moved or ended; each kept stream goes on from what its client
        has; the held-back records go now."""
        self.waiting = [s for s in self.waiting if s.request_id not in answer.drop]
        self.active = [s for s in self.active if s.request_id not in answer.drop]
        fill = [
            [s.request_id, _generate(s.prompt, s.streamed)[answer.streamed[s.request_id] :]]
            for s in self.active
            if answer.streamed.get(s.request_id, s.streamed) < s.streamed
        ]
        if fill:
            self.socket.send(_encode([int(Headers.PARTIAL_REPLY), fill]))
        if answer.outputs:
            self._send_records(answer.outputs)

    def abort(self, request_id: int) -> None:
        """Drop a waiting or running request (frees its slot); reply its ABORTED record."""
        for queue in (self.waiting, self.active):
            for index, sequence in enumerate(queue):
                if sequence.request_id == request_id:
                    del queue[index]
                    self._send_records([self._record(sequence, "ABORTED")])
                    return

    def _record(self, sequence: _Sequence, status: str) -> dict[str, Any]:
        record = self.record(sequence.request_id, sequence.prompt, sequence.sampling)
        request = record["requests"][0]
        request["generated_tokens"] = request["generated_tokens"][: sequence.generated]
        request["generated_length"] = sequence.generated
        request["status"] = status
        if status == "ABORTED" and not self.megatron_style:
            request["finish_reason"] = "abort"
        return record

    def _send_records(self, records: list[dict[str, Any]]) -> None:
        records = self.rejoin.hold_back(records)  # registered again, not yet answered: wait
        if records:
            self.socket.send(_encode([int(Headers.ENGINE_REPLY), records]))
            self.served += len(records)

    def step(self) -> None:
        """Admit, sleep for the step-time model, emit one token per request, reply."""
        finished = [s for s in self.waiting if s.budget <= 0]  # nothing to prefill for
        self.waiting = [s for s in self.waiting if s.budget > 0]
        room = self.max_batch_size - len(self.active)
        admitted, self.waiting = self.waiting[:room], self.waiting[room:]
        batch_tokens = len(self.active) + sum(len(s.prompt) for s in admitted)
        if batch_tokens:
            time.sleep(self.step_time[0] + self.step_time[1] * batch_tokens)
            self.steps += 1
            self.processed_tokens += batch_tokens
        self.active += admitted
        partial, running = [], []
        for sequence in self.active:
            sequence.generated += 1
            if sequence.generated >= sequence.budget:
                finished.append(sequence)
                continue
            running.append(sequence)
            interval = sequence.sampling.get("streaming_interval", 0)
            sequence.since += 1
            if interval > 0 and sequence.since >= interval:
                tokens = _generate(sequence.prompt, sequence.generated)[sequence.streamed :]
                partial.append([sequence.request_id, tokens])
                sequence.streamed, sequence.since = sequence.generated, 0
        self.active = running
        partial = self.rejoin.unlisted(partial)
        if partial:
            self.socket.send(_encode([int(Headers.PARTIAL_REPLY), partial]))
        if finished:
            self._send_records([self._record(s, "COMPLETED") for s in finished])

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.heartbeat_interval_s
        report = {
            "data_parallel_rank": self.rank,
            "queued": len(self.waiting),
            "active": len(self.active),
            "steps": self.steps,
            "processed_tokens": self.processed_tokens,
            "paused": self.paused,
        }
        self.socket.send(_encode([int(Headers.HEARTBEAT), report]))

    def serve(self) -> None:
        """Register, then step while there is work; block (up to a heartbeat) when idle."""
        self.register()
        sock = self.socket
        running = True
        while running:
            busy = (self.waiting or self.active) and not self.paused
            timeout = 0 if busy else int(self.heartbeat_interval_s * 1000)
            submits: list[list[Any]] = []
            if sock.poll(timeout):
                for raw in recv_ready(sock, block=False):
                    if not self.handle(_decode(raw), submits):
                        running = False
            self.answer(submits)
            if self._not_known:
                self._register_again()
            if running and not self.paused:
                self.step()
            self._heartbeat()
        sock.close()
        self.context.term()


def spawn(
    address: str,
    rank: int,
    megatron_style: bool = False,
    step_time: tuple[float, float] | None = None,
    max_batch_size: int = 16,
    heartbeat_interval_s: float = 1.0,
) -> subprocess.Popen:
    """Start one fake engine in its own process (honest measurements, real sockets).

    ``step_time=(a, b)``: a SteppedFakeEngine whose steps take ``a + b * batch_tokens`` s."""
    command = [
        sys.executable,
        "-m",
        "megatron_coord.testing.fake_engine",
        address,
        "--rank",
        str(rank),
    ]
    if megatron_style:
        command.append("--megatron")
    if step_time is not None:
        command += ["--step-time", f"{step_time[0]},{step_time[1]}"]
        command += ["--max-batch-size", str(max_batch_size)]
        command += ["--heartbeat", str(heartbeat_interval_s)]
    return subprocess.Popen(command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--megatron", action="store_true", help="register like Megatron 0.16")
    parser.add_argument(
        "--step-time", help="A,B: steps take A + B * batch_tokens seconds (SteppedFakeEngine)"
    )
    parser.add_argument("--max-batch-size", type=int, default=16, help="with --step-time")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between reports")
    args = parser.parse_args(argv)
    if args.step_time is None:
        FakeEngine(args.address, args.rank, megatron_style=args.megatron).serve()
        return
    base, per_token = (float(x) for x in args.step_time.split(","))
    SteppedFakeEngine(
        args.address,
        args.rank,
        step_time=(base, per_token),
        max_batch_size=args.max_batch_size,
        heartbeat_interval_s=args.heartbeat,
        megatron_style=args.megatron,
    ).serve()


if __name__ == "__main__":
    main()
