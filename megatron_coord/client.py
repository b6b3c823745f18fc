"""InferenceClient: submit requests to the coordinator and await their records (asyncio).

The same shape as Megatron-core 0.16's client (``start``, ``add_request`` -> Future,
``pause_engines`` ...), so code written for it runs unchanged, but built on ``zmq.asyncio``:
the listener awaits the socket instead of sleeping 5 ms between polls, which is most of the
latency of Megatron's client. Futures resolve to the finished record as a dict (Megatron's
serialized record shape, with ``generated_text`` filled in and ``latency`` in seconds). Errors
the coordinator reports for a request fail its future with ``RequestError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from .protocol import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Headers
from .sampling_params import SamplingParams

logger = logging.getLogger("megatron_coord.client")

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_END = object()  # end of a streaming request's queue


class RequestError(Exception):
    """The coordinator or an engine refused or failed a request; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _stream_tail(
    request_id: int, record: dict[str, Any], streamed_tokens: int, streamed_text: str
) -> dict[str, Any] | None:
    """The partial result a stream still owes before its final record (None: nothing)."""
    try:
        request = record["requests"][0]
        tokens = request["generated_tokens"]
        text = request.get("generated_text")
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(tokens, list) and len(tokens) == 2 and tokens[0] == "tensor":
        tokens = tokens[1]  # Megatron's serialized tensor
    if not isinstance(tokens, list) or not isinstance(text, str):
        return None
    rest_tokens = tokens[streamed_tokens:]
    rest_text = text[len(streamed_text) :] if text.startswith(streamed_text) else ""
    if not rest_tokens and not rest_text:
        return None
    return {"request_id": request_id, "tokens": rest_tokens, "text": rest_text}


class InferenceClient:
    """An asyncio client of ``DataParallelInferenceCoordinator`` (see the module docstring)."""

    def __init__(
        self,
        inference_coordinator_address: str,
        connect_timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        auth_keys: str | None = None,
    ) -> None:
        self.address = inference_coordinator_address
        self.auth_keys = auth_keys  # CURVE key directory (megatron_coord.auth), if required
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self.context: zmq.asyncio.Context | None = None
        self.socket: zmq.asyncio.Socket | None = None
        self.completion_futures: dict[int, asyncio.Future] = {}
        self.request_submission_times: dict[int, float] = {}
        self._streams: dict[int, asyncio.Queue] = {}
        self._aborting: set[int] = set()  # aborts sent, reply not yet received: sent once
        self.next_request_id = 0
        self.listener_task: asyncio.Task | None = None
        self.running = asyncio.Event()
        self.paused = asyncio.Event()
        self.stopped = asyncio.Event()
        self.last_error: RequestError | None = None  # the last error not tied to a request

    async def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Connect, handshake (raises TimeoutError after ``connect_timeout``), start listening."""
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        if self.auth_keys is not None:
            from .auth import apply_client

            apply_client(self.socket, self.auth_keys)
        self.socket.connect(self.address)
        self.running.set()
        self.paused.clear()
        self.stopped.clear()
        await self.socket.send(_encode([int(Headers.CONNECT), {"protocol": PROTOCOL_VERSION}]))
        try:
            reply = await asyncio.wait_for(self.socket.recv(), self.connect_timeout)
        except asyncio.TimeoutError:
            self._close()
            raise TimeoutError(
                f"no CONNECT_ACK from the coordinator at {self.address} within "
                f"{self.connect_timeout} s (is it running and are all engines registered?)"
            ) from None
        message = _decode(reply)
        if message[0] != Headers.CONNECT_ACK:
            self._close()
            raise ConnectionError(f"expected CONNECT_ACK from {self.address}, got {message!r}")
        self.listener_task = asyncio.get_running_loop().create_task(self._recv_task())

    # ------------------------------------------------------------------ requests

    def _submit(self, prompt: str | list[int], sampling_params: Any, streaming: bool) -> int:
        if not self.running.is_set():
            raise RuntimeError("InferenceClient is not running (call start(); not after stop)")
        if not isinstance(prompt, (str, list)):
            raise TypeError("prompt must be a string or a list of token ids")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            sampling_params if isinstance(sampling_params, dict) else sampling_params.serialize()
        )
        if streaming and not params.get("streaming_interval"):
            params = {**params, "streaming_interval": 1}
        request_id = self.next_request_id
        self.next_request_id = request_id + 1
        message = _encode([int(Headers.SUBMIT_REQUEST), request_id, prompt, params])
        self.socket.send(message, copy=len(message) < 65536)
        self.request_submission_times[request_id] = time.perf_counter()
        return request_id

    def add_request(
        self, prompt: str | list[int], sampling_params: SamplingParams | dict | None = None
    ) -> asyncio.Future:
        """Submit one request; the future resolves to its finished record (a dict)."""
        request_id = self._submit(prompt, sampling_params, streaming=False)
        future = asyncio.get_running_loop().create_future()
        future.request_id = request_id  # lets abort_request(future) find it
        self.completion_futures[request_id] = future
        return future

    async def add_request_streaming(
        self, prompt: str | list[int], sampling_params: SamplingParams | dict | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"request_id", "tokens", "text"}`` per partial result, then the final record.

        The partials' tokens and texts concatenate to the final record's ``generated_tokens``
        and ``generated_text``: what the last streamed chunk did not carry (the tokens of the
        final step, text held back inside a multi-byte character) comes as one last partial
        just before the record. Closing the iterator before the final record (``break`` out of
        ``async for``, ``aclose()``, cancellation) aborts the request, freeing its engine slot.
        """
        request_id = self._submit(prompt, sampling_params, streaming=True)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        streamed_tokens = 0
        streamed_text = ""
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                if "requests" in item:
                    tail = _stream_tail(request_id, item, streamed_tokens, streamed_text)
                    if tail is not None:
                        yield tail
                else:
                    streamed_tokens += len(item["tokens"])
                    streamed_text += item["text"]
                yield item
        finally:
            # Still registered: its final record or error never came (the listener unregisters
            # a stream when it delivers its end), so the request still runs somewhere. Aborted
            # while registered, so a later abort_request of the same id is not sent again.
            if request_id in self._streams and self.socket is not None:
                self.abort_request(request_id)
            self._streams.pop(request_id, None)
            self.request_submission_times.pop(request_id, None)

    def abort_request(self, future_or_id: asyncio.Future | int) -> None:
        """Ask the engine holding the request to abort it; its future gets the final record.

        Repeated aborts of a request still in flight send one ABORT (a stream closed after an
        explicit abort does not send a second one)."""
        request_id = getattr(future_or_id, "request_id", future_or_id)
        if request_id in self._aborting:
            return
        if request_id in self.completion_futures or request_id in self._streams:
            self._aborting.add(request_id)
        self.socket.send(_encode([int(Headers.ABORT), request_id]))

    # ------------------------------------------------------------------ replies

    async def _recv_task(self) -> None:
        """Await replies and resolve futures; drains every ready frame per wake-up."""
        sock = self.socket
        while True:
            try:
                frames = [await sock.recv()]
                with contextlib.suppress(zmq.Again):
                    while True:
                        frames.append(sock.recv(zmq.NOBLOCK).result())
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ENOTSOCK:
                    return
                raise
            for frame in frames:
                try:
                    self._dispatch(_decode(frame))
                except Exception:
                    logger.exception("client: cannot handle a message from the coordinator")

    def _dispatch(self, message: list[Any]) -> None:
        header = message[0]
        if header == Headers.ENGINE_REPLY:
            self._on_reply(message[1], message[2])
        elif header == Headers.PARTIAL_REPLY:
            queue = self._streams.get(message[1])
            if queue is not None:
                queue.put_nowait(
                    {"request_id": message[1], "tokens": message[2], "text": message[3]}
                )
        elif header == Headers.ERROR:
            self._on_error(message[1], message[2], message[3])
        elif header == Headers.PAUSE_ACK:
            self.paused.set()
        elif header == Headers.STOP_ACK:
            self.stopped.set()

    def _on_reply(self, request_id: int, record: dict[str, Any]) -> None:
        self._aborting.discard(request_id)
        started = self.request_submission_times.pop(request_id, None)
        if started is not None:
            record["latency"] = time.perf_counter() - started
        if not self._hand_over(request_id, record, failed=False):
            logger.warning("client: reply for unknown request %r", request_id)

    def _on_error(self, request_id: Any, code: str, text: str) -> None:
        if type(request_id) is int:
            self._aborting.discard(request_id)
        error = RequestError(code, text)
        self.request_submission_times.pop(request_id, None)
        if self._hand_over(request_id, error, failed=True):
            return
        logger.warning("client: coordinator error: %s", error)
        self.last_error = error

    def _hand_over(self, request_id: Any, outcome: Any, failed: bool) -> bool:
        """Give a request's final outcome (record, or RequestError if ``failed``) to whoever
        waits for it: its future, or its stream (a record then ends the stream). False if
        nobody does."""
        future = self.completion_futures.pop(request_id, None)
        if future is not None:
            if not future.done():
                if failed:
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            return True
        queue = self._streams.pop(request_id, None)
        if queue is None:
            return False
        queue.put_nowait(outcome)
        if not failed:
            queue.put_nowait(_END)
        return True

    # ------------------------------------------------------------------ control

    def _send_signal_to_engines(self, signal: Headers) -> None:
        self.socket.send(_encode([int(signal)]))

    def pause_engines(self) -> Awaitable:
        """Pause every engine; the awaitable resolves once all of them acknowledged."""
        self.paused.clear()
        self._send_signal_to_engines(Headers.PAUSE)
        return self.paused.wait()

    def unpause_engines(self) -> None:
        """Let paused engines run again."""
        self.paused.clear()
        self.running.set()
        self._send_signal_to_engines(Headers.UNPAUSE)

    def suspend_engines(self) -> None:
        """Pause, then suspend (engines may release memory), as Megatron's client does."""
        self._send_signal_to_engines(Headers.PAUSE)
        self._send_signal_to_engines(Headers.SUSPEND)

    def resume_engines(self) -> None:
        """Resume, then unpause."""
        self._send_signal_to_engines(Headers.RESUME)
        self._send_signal_to_engines(Headers.UNPAUSE)

    def stop_engines(self) -> Awaitable:
        """Stop every engine; the awaitable resolves once all acknowledged (the coordinator exits)."""
        self._send_signal_to_engines(Headers.STOP)
        self.running.clear()
        return self.stopped.wait()

    def stop(self) -> None:
        """Cancel the listener and close the socket.

        Pending futures are cancelled, and open streams end with a ConnectionError, so no
        reader waits forever for a record that can no longer arrive.
        """
        if self.listener_task is not None:
            self.listener_task.cancel()
            self.listener_task = None
        for future in self.completion_futures.values():
            if not future.done():
                future.cancel()
        self.completion_futures.clear()
        for queue in self._streams.values():
            queue.put_nowait(ConnectionError("the InferenceClient was stopped"))
        self._close()

    def _close(self) -> None:
        self.running.clear()
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        if self.context is not None:
            self.context.term()
            self.context = None
