"""InferenceClient: submit requests to the coordinator and await their records (asyncio).

The same shape as Megatron-core 0.16's client (``start``, ``add_request`` -> Future,
``pause_engines`` ...), so code written for it runs unchanged, but built on ``zmq.asyncio``:
the listener awaits the socket instead of sleeping 5 ms between polls, which is most of the
latency of Megatron's client. Futures resolve to the finished record as a dict (Megatron's
serialized record shape, with ``generated_text`` filled in and ``latency`` in seconds). Errors
the coordinator reports for a request fail its future with ``RequestError``. The requests in
flight, their futures and stream queues are kept in ``client_requests.RequestsInFlight``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from .client_reconnect import Reconnection
from .client_requests import END, RequestError, RequestsInFlight, stream_tail
from .client_updates import WeightUpdatesClient
from .coordinator_stats import is_serving
from .liveness_contract import client_settings, confirmed_cadence
from .protocol import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Headers
from .sampling_params import SamplingParams

logger = logging.getLogger("megatron_coord.client")

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_COORDINATOR_TIMEOUT_S = 3.0
DEFAULT_RECONNECT_TIMEOUT_S = 30.0


def _unencodable(prompt: str | list[int], params: dict[str, Any]) -> str:
    """Which part of a request msgpack cannot carry (an int outside 64 bits, a lone surrogate)."""
    for name, value in [("prompt", prompt), *((f"sampling_params.{k}", v) for k, v in params.items())]:  # fmt: skip
        try:
            _encode(value)
        except (OverflowError, UnicodeEncodeError) as exc:
            return f"{name} cannot be sent: {exc}"
    return "the request cannot be encoded"


class InferenceClient(Reconnection, WeightUpdatesClient):
    """An asyncio client of ``DataParallelInferenceCoordinator`` (see the module docstring).

    It outlives its coordinator: it pings when the connection is quiet (``ping_interval``: its
    ``heartbeat_interval``, or faster if CONNECT_ACK asks, see liveness_contract.py) and after
    ``coordinator_timeout`` seconds without a word (or at once when a restarted
    coordinator does not know it) it opens a new connection, handshakes again and, with
    ``resubmit`` (the default), sends again every request in flight of which nothing reached the
    caller yet; a stream that already yielded a part fails with ``ConnectionError`` (a partial
    generation cannot be resumed). Requests still waiting ``reconnect_timeout`` seconds after the
    loss fail with ``ConnectionError``, as do new ones until the coordinator is back; the same
    object serves again once it is. ``connected`` is set while a coordinator has acknowledged.
    """

    def __init__(
        self,
        inference_coordinator_address: str,
        connect_timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        auth_keys: str | None = None,
        heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL_S,
        coordinator_timeout: float = DEFAULT_COORDINATOR_TIMEOUT_S,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT_S,
        resubmit: bool = True,
    ) -> None:
        if heartbeat_interval is not None and not 0 < heartbeat_interval < coordinator_timeout:
            raise ValueError("heartbeat_interval must be in (0, coordinator_timeout)")
        self.address = inference_coordinator_address
        self.auth_keys = auth_keys  # CURVE key directory (megatron_coord.auth), if required
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self.heartbeat_interval = heartbeat_interval  # None: never ping, never reconnect
        self.ping_interval = heartbeat_interval  # the cadence the coordinator confirmed
        self.coordinator_timeout = coordinator_timeout
        self.reconnect_timeout = reconnect_timeout
        self.resubmit = resubmit
        self.context: zmq.asyncio.Context | None = None
        self.socket: zmq.asyncio.Socket | None = None
        self._requests = RequestsInFlight()
        # Megatron's client's names for two of its tables.
        self.completion_futures = self._requests.futures
        self.request_submission_times = self._requests.submission_times
        self._stats_waiters: deque[asyncio.Future] = deque()
        self.next_request_id = 0
        self.listener_task: asyncio.Task | None = None
        self._watchdog_task: asyncio.Task | None = None
        self.running = asyncio.Event()
        self.paused = asyncio.Event()
        self.stopped = asyncio.Event()
        self.connected = asyncio.Event()
        self.last_error: RequestError | None = None  # the last error not tied to a request
        self.lost_reason: str | None = None  # why the coordinator was lost, while it is
        self.reconnects = 0  # handshakes after a loss
        self._last_heard = 0.0
        self._reconnect_deadline: float | None = None  # requests wait until then

    async def start(self, loop: asyncio.AbstractEventLoop | None = None, wait: bool = True) -> None:
        """Connect, handshake, start listening. With ``wait`` (default) return once the
        coordinator acknowledged (raises TimeoutError after ``connect_timeout``); without,
        return at once and handshake in the background (``connected`` tells when)."""
        self.context = zmq.asyncio.Context()
        self.running.set()
        self.paused.clear()
        self.stopped.clear()
        sock = self._open_socket()
        if wait:
            try:
                reply = await asyncio.wait_for(sock.recv(), self.connect_timeout)
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
            self._on_connect_ack(message)
        else:
            self._reconnect_deadline = time.monotonic() + self.connect_timeout
        self.listener_task = asyncio.get_running_loop().create_task(self._recv_task(sock))
        if self.heartbeat_interval is not None:
            self._watchdog_task = asyncio.get_running_loop().create_task(self._watchdog())

    def _open_socket(self) -> zmq.asyncio.Socket:
        """A new DEALER to the coordinator with CONNECT queued first: whatever is sent on it
        later reaches the coordinator after the handshake (ZMQ keeps a socket's order)."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.auth_keys is not None:
            from .auth import apply_client

            apply_client(sock, self.auth_keys)
        sock.connect(self.address)
        settings = client_settings(self.heartbeat_interval, self.coordinator_timeout)
        sock.send(_encode([int(Headers.CONNECT), {"protocol": PROTOCOL_VERSION, **settings}]))
        self.socket = sock
        return sock

    def _on_connect_ack(self, message: list[Any]) -> None:
        confirmed = confirmed_cadence(message, self.heartbeat_interval)  # may ask pings faster
        self.ping_interval = confirmed or self.ping_interval
        if self.lost_reason is not None:
            logger.warning("client: the coordinator at %s is back", self.address)
            self.reconnects += 1
        self.lost_reason = None
        self._reconnect_deadline = None
        self._last_heard = time.monotonic()
        self.connected.set()

    async def wait_ready(self, min_engines: int = 1, timeout: float | None = None) -> dict:
        """Wait until the coordinator acknowledged and has ``min_engines`` healthy engines
        registered; returns its STATS. TimeoutError after ``timeout`` seconds (None: never)."""

        async def ready() -> dict:
            while True:
                await self.connected.wait()
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    stats = await self.stats(timeout=1.0)
                    engines = [e for e in stats["engines"] if is_serving(e)]
                    if len(engines) >= min_engines:
                        return stats
                await asyncio.sleep(0.05)

        try:
            return await asyncio.wait_for(ready(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"the coordinator at {self.address} did not have {min_engines} engine(s) ready "
                f"within {timeout} s"
            ) from None

    async def stats(self, timeout: float = 5.0) -> dict:
        """The coordinator's STATS (engines, their load, requests in flight)."""
        if not self.connected.is_set():
            raise ConnectionError(self._unreachable())
        future = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(future)
        self.socket.send(_encode([int(Headers.STATS)]))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            if not future.done():
                future.cancel()  # its reply, if it comes, is dropped in order

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
        if self._gave_up():
            raise ConnectionError(self._unreachable())
        request_id = self.next_request_id
        try:
            message = _encode([int(Headers.SUBMIT_REQUEST), request_id, prompt, params])
        except (OverflowError, UnicodeEncodeError):
            raise ValueError(_unencodable(prompt, params)) from None
        self.next_request_id = request_id + 1
        self.socket.send(message, copy=len(message) < 65536)
        if self.heartbeat_interval is not None:
            self._requests.submits[request_id] = message  # sent again if the coordinator is lost
        self.request_submission_times[request_id] = time.perf_counter()
        return request_id

    def add_request(
        self, prompt: str | list[int], sampling_params: SamplingParams | dict | None = None
    ) -> asyncio.Future:
        """Submit one request; the future resolves to its finished record (a dict). Raises
        ValueError for what msgpack cannot carry (an integer outside 64 bits, a lone
        surrogate), naming it."""
        request_id = self._submit(prompt, sampling_params, streaming=False)
        future = asyncio.get_running_loop().create_future()
        future.request_id = request_id  # lets abort_request(future) find it
        self.completion_futures[request_id] = future
        return future

    async def add_request_streaming(
        self, prompt: str | list[int], sampling_params: SamplingParams | dict | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"request_id", "tokens", "text"}`` per partial result, then the final record.
        A request that asked for log-probs or top-N gets the new tokens' ones in its partial
        results too (``generated_log_probs``, ``generated_top_n_logprobs``).

        The partials' tokens and texts concatenate to the final record's ``generated_tokens``
        and ``generated_text``: what the last streamed chunk did not carry (the tokens of the
        final step, text held back inside a multi-byte character) comes as one last partial
        just before the record. Closing the iterator before the final record (``break`` out of
        ``async for``, ``aclose()``, cancellation) aborts the request, freeing its engine slot.
        """
        request_id = self._submit(prompt, sampling_params, streaming=True)
        requests = self._requests
        queue: asyncio.Queue = asyncio.Queue()
        requests.streams[request_id] = queue
        streamed_tokens = 0
        streamed_text = ""
        try:
            while True:
                item = await queue.get()
                if item is END:
                    return
                if isinstance(item, Exception):
                    raise item
                if "requests" in item:
                    tail = stream_tail(request_id, item, streamed_tokens, streamed_text)
                    if tail is not None:
                        yield tail
                else:
                    streamed_tokens += len(item["tokens"])
                    streamed_text += item["text"]
                    requests.partial.add(request_id)
                yield item
        finally:
            # Still registered: its final record or error never came (the listener unregisters
            # a stream when it delivers its end), so the request still runs somewhere. Aborted
            # while registered, so a later abort_request of the same id is not sent again.
            if request_id in requests.streams and self.socket is not None:
                self.abort_request(request_id)
            requests.streams.pop(request_id, None)
            requests.forget(request_id)

    def abort_request(self, future_or_id: asyncio.Future | int) -> None:
        """Ask the engine holding the request to abort it; its future gets the final record.

        Repeated aborts of a request still in flight send one ABORT (a stream closed after an
        explicit abort does not send a second one)."""
        request_id = getattr(future_or_id, "request_id", future_or_id)
        if self._requests.first_abort(request_id):
            self.socket.send(_encode([int(Headers.ABORT), request_id]))

    # ------------------------------------------------------------------ replies

    async def _recv_task(self, sock: zmq.asyncio.Socket) -> None:
        """Await replies on ``sock`` and resolve futures; drains every ready frame per wake-up.
        Ends when the socket is replaced (a reconnection) or closed."""
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
            self._last_heard = time.monotonic()
            for frame in frames:
                if self.socket is not sock:
                    return  # lost and replaced: what the old connection still says is stale
                try:
                    self._dispatch(_decode(frame))
                except Exception:
                    logger.exception("client: cannot handle a message from the coordinator")

    def _dispatch(self, message: list[Any]) -> None:
        header = message[0]
        if header == Headers.ENGINE_REPLY:
            if not self._requests.finish(message[1], message[2]):
                logger.warning("client: reply for unknown request %r", message[1])
        elif header == Headers.PARTIAL_REPLY:
            queue = self._requests.streams.get(message[1])
            if queue is not None:
                item = {"request_id": message[1], "tokens": message[2], "text": message[3]}
                if len(message) > 4:  # the new tokens' log-probs / top-N, when asked for
                    item.update(message[4])
                queue.put_nowait(item)
        elif header == Headers.ERROR:
            if message[2] == "not_connected" and self.heartbeat_interval is not None:
                # A coordinator that does not know us: it restarted at the same address.
                self._lose("the coordinator does not know this client (it restarted)")
                return
            self._on_error(message[1], message[2], message[3])
        elif header == Headers.HEARTBEAT:
            pass  # an answer to our ping: the coordinator lives (noted on receipt)
        elif header == Headers.STATS:
            while self._stats_waiters:
                waiter = self._stats_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(message[1])
                    break
        elif header == Headers.CONNECT_ACK:
            self._on_connect_ack(message)  # what was resent after a loss is queued behind
        elif header == Headers.PAUSE_ACK:
            self.paused.set()
        elif header == Headers.STOP_ACK:
            self.stopped.set()
        elif header in (Headers.UPDATE_WEIGHTS_DONE, Headers.WEIGHT_TRANSFER_READY):
            self._on_update_message(message)  # client_updates.py

    def _on_error(self, request_id: Any, code: str, text: str) -> None:
        error = RequestError(code, text)
        if self._requests.fail(request_id, error) or self._update_refused(request_id, error):
            return
        logger.warning("client: coordinator error: %s", error)
        self.last_error = error

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
        for task in (self.listener_task, self._watchdog_task):
            if task is not None:
                task.cancel()
        self.listener_task = self._watchdog_task = None
        self._requests.abandon(ConnectionError("the InferenceClient was stopped"))
        self._abandon_updates(ConnectionError("the InferenceClient was stopped"))
        self._close()

    def _close(self) -> None:
        self.running.clear()
        self.connected.clear()
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        if self.context is not None:
            self.context.term()
            self.context = None
