"""The data-parallel inference coordinator: one ROUTER between clients and engines.

Process and protocol are in DESIGN.md. This module holds the class with Megatron's API, the
socket and the loop, and the two tables from header to handler; the state lives in the parts
it is composed of:

* ``RequestTable`` (requests.py): every request in flight, from admission to its one outcome;
* ``EngineRegistry`` (engines.py): registered engines, their routing order, heartbeat silence;
* ``PeerMonitor`` (liveness.py): which peer's connection closed (engines and clients);
* ``ControlState`` (control.py): pause / suspend / stop and their acks;
* ``GracefulShutdown`` (shutdown.py), ``Limits`` (limits.py), the routing policy (routing/),
  ``TextCodec`` (text.py);
* the handlers of client messages (client_handlers.py) and of engine messages, engine death and
  fail-over (engine_handlers.py).

Contracts others rely on:

* Every frame is validated; bad input is answered with ``[ERROR, client_request_id | None,
  code, message]`` to peers that speak our protocol (clients that sent ``[CONNECT, {"protocol":
  n}]``, engines that sent REGISTER) and only logged for peers that speak Megatron's, which would
  crash on a header >= 100. It never stops the loop. A sender that never sent CONNECT (and is no
  engine) is answered ``not_connected``.
* The loop drains every ready frame per wake-up and flushes the wake-up's submits together, so
  text prompts are tokenized in one call.
* The ROUTER is ROUTER_MANDATORY with no send high-water mark: a reply to a client that has gone
  is dropped (logged), and a slow client never blocks the loop or loses a reply.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import zmq

from ..auth import ServerAuth, check_bind
from ..exit_codes import ConfigurationError
from ..ports import port_in_use_message
from ..protocol import DEFAULT_MAX_MESSAGE_BYTES, ErrorCode, Headers, ProtocolError
from .client_handlers import ClientHandlers
from .control import ControlState, State019, next_019
from .dialects import CONTROL_TO_019, Dialect, Wire019, failed_record, submit_for_019
from .engine_handlers import EngineHandlers
from .engines import EngineRegistry
from .limits import Limits
from .liveness import DEFAULT_ENGINE_TIMEOUT_S, PeerMonitor
from .requests import RequestTable
from .routing import make_policy
from .shutdown import DEFAULT_SHUTDOWN_GRACE_S, GracefulShutdown
from .text import TextCodec
from .wire import HEADER_ONLY, client_request_id_of, encode, peek_header

logger = logging.getLogger("megatron_coord.coordinator")

_MAX_EARLY_FRAMES = 65536
HEADER_ONLY_019 = {h: encode([int(v)]) for h, v in CONTROL_TO_019.items()}
DEFAULT_FAILOVER_WAIT_S = 10.0
DEFAULT_WAIT_FOR_ENGINE_S = 30.0
# Coordinator options of the prefix_aware policy -> its keyword arguments (routing/prefix_aware.py).
_PREFIX_OPTIONS = {
    "prefix_load_factor": "load_factor",
    "prefix_index_blocks": "index_blocks",
    "prefix_block_size": "block_size",
}
# pyzmq's Cython socket methods, bypassing its Python wrappers on the hot path (ints, not enums).
_zmq_send = zmq.backend.Socket.send
_zmq_recv = zmq.backend.Socket.recv
_zmq_get = zmq.backend.Socket.get
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


class DataParallelInferenceCoordinator:
    """Routes requests from clients to data-parallel engines and their results back.

    Binds a ROUTER (``host`` option, 127.0.0.1 by default; a port in use falls back to a random
    port with a warning, or with ``strict_port=True`` raises ``ConfigurationError``; port None or
    0 binds any free port), sends its address through ``pipe_connection`` and blocks until
    ``data_parallel_size`` engines have registered. ``start()`` then serves until every engine
    acknowledged a STOP. ``data_parallel_size=0``: serve at once and let engines join and leave
    at any time (the standalone coordinator).

    Options (keyword, all optional): ``host``, ``max_message_bytes`` (ZMQ_MAXMSGSIZE),
    ``routing`` ("round_robin", the default, "least_loaded" or "prefix_aware": see routing/;
    the latter takes ``prefix_load_factor`` (1.5), ``prefix_index_blocks`` (1,000,000) and
    ``prefix_block_size`` (256, for engines that do not report theirs)), ``log_level``,
    ``registration_timeout`` (seconds, None = wait forever, as Megatron does),
    ``engine_timeout`` (seconds of silence before an engine of ours is dead, 3),
    ``max_outstanding`` and ``max_outstanding_per_engine`` (``overloaded`` past them),
    ``request_timeout`` (seconds, None), ``shutdown_grace`` (seconds in-flight requests get after
    SIGTERM/SIGINT, 10), ``shutdown_stops_engines`` (end a graceful shutdown with a STOP round, so
    the engines of a launch end too; False), ``failover_wait`` (seconds the requests of a dead engine wait for an
    engine when none is left, 10; 0: fail them at once), ``wait_for_engine`` (seconds a new
    request waits for an engine when none can take it, as while replicas still load, 30; 0:
    ``no_engine`` at once), ``strict_port`` (see above), ``auth_keys`` (CURVE key directory), ``insecure_no_auth`` (a
    non-loopback bind without keys, with a loud warning), ``megatron_engines`` ("0.16", the
    default, or "0.19": the Megatron-core version of engines that register with an empty frame,
    which looks the same in both; dialects.py).
    """

    def __init__(
        self,
        pipe_connection: Connection | None,
        data_parallel_size: int,
        tokenizer: Any,
        inference_coordinator_port: int | None = None,
        deterministic_mode: bool = False,
        **options: Any,
    ) -> None:
        if type(data_parallel_size) is not int or data_parallel_size < 0:
            raise ValueError("data_parallel_size must be a non-negative integer (0: any number)")
        host = options.pop("host", "127.0.0.1")
        auth_keys = options.pop("auth_keys", None)
        insecure_no_auth = bool(options.pop("insecure_no_auth", False))
        self.limits = Limits(
            max_outstanding=options.pop("max_outstanding", Limits.max_outstanding),
            max_outstanding_per_engine=options.pop(
                "max_outstanding_per_engine", Limits.max_outstanding_per_engine
            ),
            request_timeout=options.pop("request_timeout", None),
        )
        self.engine_timeout = options.pop("engine_timeout", DEFAULT_ENGINE_TIMEOUT_S)
        self.failover_wait = float(options.pop("failover_wait", DEFAULT_FAILOVER_WAIT_S))
        if not self.failover_wait >= 0:
            raise ValueError("failover_wait must be a non-negative number of seconds")
        self.wait_for_engine = float(options.pop("wait_for_engine", DEFAULT_WAIT_FOR_ENGINE_S))
        if not self.wait_for_engine >= 0:
            raise ValueError("wait_for_engine must be a non-negative number of seconds")
        self.shutdown = GracefulShutdown(
            options.pop("shutdown_grace", DEFAULT_SHUTDOWN_GRACE_S),
            stop_engines=bool(options.pop("shutdown_stops_engines", False)),
        )
        self.max_message_bytes = options.pop("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        routing = options.pop("routing", "round_robin")
        prefix_options = {
            key: options.pop(option) for option, key in _PREFIX_OPTIONS.items() if option in options
        }
        make_policy(routing, (), **prefix_options)  # a bad name or option fails before binding
        log_level = options.pop("log_level", None)
        registration_timeout = options.pop("registration_timeout", None)
        self.strict_port = bool(options.pop("strict_port", False))
        megatron_engines = options.pop("megatron_engines", "0.16")
        if megatron_engines not in ("0.16", "0.19"):
            raise ValueError(f'megatron_engines must be "0.16" or "0.19", not {megatron_engines!r}')
        self.megatron_engines = Dialect(megatron_engines)
        if options:
            raise TypeError(f"unknown coordinator options: {sorted(options)}")
        if log_level is not None:
            logger.setLevel(log_level)

        self.data_parallel_size = data_parallel_size
        self.deterministic_mode = deterministic_mode
        self.text = TextCodec(tokenizer)
        self.tokenizer = self.text.tokenizer
        self.registry = EngineRegistry(self.engine_timeout, deterministic_mode)
        self.requests = RequestTable()
        self.control = ControlState()
        self.clients: dict[bytes, Dialect] = {}  # identity -> the protocol it speaks
        self.gone_clients: set[bytes] = set()  # found gone by a send: freed after the wake-up
        self.requests_resubmitted = 0
        self.now = time.monotonic()
        self.stranger_fd: int | None = None  # connection of the frame being handled, if new
        self._running = False
        self._early_frames: list[tuple[list[bytes], int | None]] = []

        check_bind(host, auth_keys, insecure_no_auth)
        self.context = zmq.Context()
        self._auth: ServerAuth | None = None
        self.router_socket: zmq.Socket | None = None
        self.monitor: PeerMonitor | None = None
        try:  # a failure past this point closes what it opened (the port is free again)
            if auth_keys is not None:
                self._auth = ServerAuth(self.context, auth_keys)
            self.router_socket = self._bind(host, inference_coordinator_port)
            self.monitor = PeerMonitor(self.router_socket, self.engine_timeout)
            self.addr = self.router_socket.getsockopt_string(zmq.LAST_ENDPOINT)
            if pipe_connection is not None:
                pipe_connection.send(self.addr)
                pipe_connection.close()
            self.client_handlers = ClientHandlers(self)
            self.engine_handlers = EngineHandlers(self)
            logger.info(
                "coordinator at %s: waiting for %d engine(s)", self.addr, data_parallel_size
            )
            self._register_engines(registration_timeout)
        except BaseException:
            self._close()
            raise
        self.registry.fix_order()
        self.routing_policy = make_policy(
            routing,
            self.identities_of_data_parallel_ranks,
            deterministic=deterministic_mode,
            engine_info=lambda identity: self.registry.engines[identity].info,
            **prefix_options,
        )
        self.routes_by_tokens = self.routing_policy.needs_tokens
        # Requests routed later are handed to the policy's on_submit then (client_handlers).
        self.tracks_load = self.routing_policy.tracks_load or self.routes_by_tokens
        logger.info("coordinator: %d engine(s) registered", len(self.registry))

    # ------------------------------------------------------------------ the seed's attributes

    @property
    def identities_of_data_parallel_ranks(self) -> deque[bytes]:
        """The engines that get requests, in routing order."""
        return self.registry.order

    @property
    def engines(self) -> dict[bytes, Any]:
        return self.registry.engines

    @property
    def request_id_to_client_id(self) -> dict[int, bytes]:
        return self.requests.client_of

    @property
    def request_id_to_client_request_id(self) -> dict[int, Any]:
        return self.requests.client_request_id_of

    @property
    def next_request_id(self) -> int:
        return self.requests.next_request_id

    @property
    def engines_lost(self) -> int:
        return self.registry.engines_lost

    # ------------------------------------------------------------------ setup

    def _bind(self, host: str, port: int | None) -> zmq.Socket:
        """Bind the ROUTER; a port in use falls back to a random one with a warning (the
        seed's behaviour), or with ``strict_port`` raises ConfigurationError naming its holder."""
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 1000)
        if self._auth is not None:
            self._auth.apply(sock)
        if port:  # None or 0: any free port
            try:
                sock.bind(f"tcp://{host}:{port}")
                return sock
            except zmq.ZMQError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                if not in_use or self.strict_port:
                    sock.close(0)
                    if in_use:
                        raise ConfigurationError(port_in_use_message(host, port)) from None
                    raise
                logger.warning("port %d is in use; binding a random port instead", port)
        sock.bind(f"tcp://{host}:*")
        return sock

    def _register_engines(self, timeout: float | None) -> None:
        """Block until data_parallel_size engines registered; queue client frames meanwhile."""
        sock = self.router_socket
        while len(self.registry) < self.data_parallel_size:
            if timeout is not None and not sock.poll(int(timeout * 1000)):
                raise TimeoutError(
                    f"only {len(self.registry)} of {self.data_parallel_size} engines registered "
                    f"within {timeout} s"
                )
            parts = sock.recv_multipart(copy=False)
            self.stranger_fd = parts[-1].get(zmq.SRCFD)  # learned by the registration
            frames = [part.bytes for part in parts]
            if len(frames) == 2 and self.engine_handlers.try_register(frames[0], frames[1]):
                continue
            if len(self._early_frames) < _MAX_EARLY_FRAMES:
                self._early_frames.append((frames, self.stranger_fd))
            else:
                logger.warning("dropping a frame that arrived before engines registered")

    # ------------------------------------------------------------------ public API

    def get_next_data_parallel_rank(self) -> bytes:
        """The ZMQ identity of the engine that gets the next request (the routing policy's pick)."""
        return self.routing_policy.choose()

    def start(self) -> None:
        """Serve until every engine acknowledged STOP. Drains every ready frame per wake-up.

        Frames are read with the Cython socket methods directly: pyzmq's Python wrappers
        (recv_multipart/send_multipart) cost 3-4x more per message than the frames themselves.
        """
        sock = self.router_socket
        recv = _zmq_recv
        rcvmore = _zmq_get
        handle = self._handle
        known = self.monitor.identity_to_fd  # peers whose connection is known: fast path
        flush = self.client_handlers.flush
        self._running = True
        self.now = time.monotonic()
        early, self._early_frames = self._early_frames, []
        for frames, fd in early:
            self.stranger_fd = fd
            self._handle_frames(frames)
        flush()
        items = self._poll_items()
        monitor = self.monitor.socket
        while self._running:
            # Block until a frame, a monitor event, a signal or the next deadline (liveness,
            # request timeouts, shutdown grace): timers cost nothing while nothing is due.
            ready = zmq.zmq_poll(items, self._poll_timeout_ms())
            self.now = time.monotonic()
            if self.shutdown.wake_r is not None:
                self.shutdown.drain_wakeups()
            try:
                while self._running:
                    identity = recv(sock, _NOBLOCK)
                    if identity in known:
                        payload = recv(sock, _NOBLOCK)  # a message's frames arrive together
                    else:
                        payload = self._recv_stranger(sock)
                    if rcvmore(sock, _RCVMORE):
                        self._handle_frames([identity, payload, *self._rest(sock)])
                    else:
                        handle(identity, payload)
            except zmq.Again:
                pass
            flush()
            self._after_wakeup(any(item[0] is monitor for item in ready))

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful shutdown (main thread only)."""
        self.shutdown.install_signal_handlers()

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown at the next wake-up (safe from a signal handler)."""
        self.shutdown.request()

    def stop(self) -> None:
        """Close the socket and the ZMQ context."""
        self._running = False
        self._close()

    def _close(self) -> None:
        """Close every socket, then the context (explicitly: a context left to the garbage
        collector can be destroyed before its sockets, and then blocks forever)."""
        self.shutdown.close()
        if self.monitor is not None:
            self.monitor.close()
        if self._auth is not None:
            self._auth.stop()
        if self.router_socket is not None:
            self.router_socket.close()
        self.context.term()

    def detokenize(self, finished_request_record: dict[str, Any]) -> None:
        """Fill ``generated_text`` (and ``prompt`` where it is None) of a record, in place."""
        self.text.detokenize_records([finished_request_record], self.requests.prompt_text)

    @classmethod
    def entrypoint(
        cls,
        pipe_connection: Connection,
        ready_event: Any,
        data_parallel_size: int,
        tokenizer: Any,
        inference_coordinator_port: int | None = None,
        deterministic_mode: bool = False,
        **options: Any,
    ) -> None:
        """Build, signal ``ready_event`` and serve: the target of a spawned process."""
        if options.get("log_level") is not None:
            logging.basicConfig(level=options["log_level"])
        coordinator = cls(
            pipe_connection,
            data_parallel_size,
            tokenizer,
            inference_coordinator_port,
            deterministic_mode,
            **options,
        )
        if threading.current_thread() is threading.main_thread():
            coordinator.install_signal_handlers()  # SIGTERM/SIGINT: graceful shutdown
        ready_event.set()
        try:
            coordinator.start()
        except KeyboardInterrupt:
            logger.info("coordinator interrupted")
        coordinator.stop()
        logger.info("coordinator shut down")

    # ------------------------------------------------------------------ receiving

    def _recv_stranger(self, sock: zmq.Socket) -> bytes:
        """The payload of a peer not known yet, noting its connection's file descriptor (read
        by the registration or CONNECT it may be, so a closed connection can be traced)."""
        frame = _zmq_recv(sock, _NOBLOCK, False)
        self.stranger_fd = frame.get(zmq.SRCFD)
        return frame.bytes

    @staticmethod
    def _rest(sock: zmq.Socket) -> list[bytes]:
        """The remaining frames of a multi-frame message (which is then refused)."""
        frames = [_zmq_recv(sock, 0)]
        while _zmq_get(sock, _RCVMORE):
            frames.append(_zmq_recv(sock, 0))
        return frames

    def _handle_frames(self, frames: list[bytes]) -> None:
        """Act on a ROUTER message given as a frame list (queued early, or multi-frame)."""
        if len(frames) == 2:
            self._handle(frames[0], frames[1])
            return
        identity = frames[0]
        logger.warning("message of %d frames from %r (expected 1)", len(frames) - 1, identity)
        self.send_error(identity, None, ErrorCode.MALFORMED, "a message must be one frame")

    def _handle(self, identity: bytes, payload: bytes) -> None:
        """Act on one ROUTER message; every failure is contained here."""
        header = peek_header(payload)
        try:
            engine = self.registry.engines.get(identity)
            if engine is not None:
                self.engine_handlers.handle(engine, header, payload)
            elif identity in self.clients:
                self.client_handlers.handle(identity, header, payload)
            else:
                self.engine_handlers.handle_stranger(identity, header, payload)
        except ProtocolError as exc:
            logger.warning("rejected a message from %r: %s", identity, exc)
            self.send_error(
                identity, self._request_refused(identity, header, payload, exc), exc.code, str(exc)
            )
        except Exception:  # never let one message stop the coordinator
            logger.exception("internal error handling a message from %r", identity)
            self.send_error(identity, None, ErrorCode.MALFORMED, "internal error")

    def _request_refused(
        self, identity: bytes, header: int, payload: bytes, exc: ProtocolError
    ) -> Any:
        """The client_request_id a refusal answers (best effort), None if it answers none.

        A 0.19 client is answered only for a submit it awaits no other answer for: its
        client resolves the awaited request with any reply and fails on a reply it awaits none
        for, so a refused duplicate id or a bad control message gets no reply at all."""
        if self.clients.get(identity) is Dialect.MEGATRON_019 and (
            header != Wire019.SUBMIT_REQUEST or exc.code is ErrorCode.DUPLICATE_REQUEST_ID
        ):
            return None
        return client_request_id_of(payload)

    # ------------------------------------------------------------------ sending

    def send(self, identity: bytes, payload: bytes) -> bool:
        """Send one message; False (and logged) if the peer is gone."""
        try:
            _zmq_send(self.router_socket, identity, _SNDMORE)
            _zmq_send(self.router_socket, payload, 0)
            return True
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            logger.info("peer %r is gone; dropped a message for it", identity)
            if identity in self.clients:
                self.gone_clients.add(identity)  # its requests are freed after this wake-up
            return False

    def send_quietly(self, identity: bytes, payload: bytes) -> None:
        """Send if the peer is still connected; never mistake an engine for a gone client."""
        with contextlib.suppress(zmq.ZMQError):
            self.router_socket.send_multipart([identity, payload], zmq.NOBLOCK)

    def send_error(self, identity: bytes, client_request_id: Any, code: ErrorCode, text: str):
        """ERROR to ``identity`` if it speaks our protocol; a 0.19 client gets a FAILED record
        for its request (with ``client_request_id`` None: nothing, as Megatron's 0.16 peers)."""
        engine = self.registry.engines.get(identity)
        # strangers never said CONNECT: they get the error
        dialect = engine.dialect if engine is not None else self.clients.get(identity, Dialect.OURS)
        if dialect is Dialect.OURS:
            self.send(identity, encode([int(Headers.ERROR), client_request_id, code.value, text]))
        elif dialect is Dialect.MEGATRON_019 and engine is None and client_request_id is not None:
            record = failed_record(client_request_id, code.value, text)
            self.send(identity, encode([int(Wire019.ENGINE_REPLY), client_request_id, record]))

    def send_submit(self, identity: bytes, frame: bytes) -> bool:
        """Send a SUBMIT_REQUEST frame (kept in our header) in the engine's protocol."""
        if identity in self.registry.speaks_019:
            frame = submit_for_019(frame)
        return self.send(identity, frame)

    def speaks_ours(self, identity: bytes) -> bool:
        """Whether a registered engine takes our extensions (ABORT): Megatron's crash on them."""
        engine = self.registry.engines.get(identity)
        return engine is not None and engine.ours

    def send_control(self, identity: bytes, header: Headers) -> None:
        """A control signal to one engine, in its protocol; a 0.19 engine only gets the
        signals its state allows (it asserts against the others) and follows 0.19's states."""
        engine = self.registry.engines[identity]
        if engine.dialect is not Dialect.MEGATRON_019:
            self.send(identity, HEADER_ONLY[header])
            return
        new_state = next_019(engine.state_019, header)
        if new_state is None:
            logger.info(
                "not sending %s to 0.19 engine %r: it is %s",
                header.name,
                identity,
                engine.state_019.value,
            )
            return
        engine.state_019 = new_state
        self.send(identity, HEADER_ONLY_019[header])

    def awaited_from(self, ack: Headers) -> set[bytes]:
        """The engines whose ``ack`` (PAUSE_ACK / STOP_ACK) completes a round: every engine but
        0.19's, which acknowledge nothing; for STOP also the 0.19 engines sent it, which leave
        the round by disconnecting."""
        engines = self.registry.engines
        return {
            i
            for i in self.registry.order
            if engines[i].dialect is not Dialect.MEGATRON_019
            or (ack is Headers.STOP_ACK and engines[i].state_019 is State019.STOPPING)
        }

    # ------------------------------------------------------------------ ending requests

    def free(self, request_id: int, generated: int | None = None) -> tuple[bytes, Any] | None:
        """Forget a request; returns (client identity, client_request_id), None if it ended.

        ``generated``: tokens in its final record (for the routing policy's accounting)."""
        ended = self.requests.free(request_id)
        if ended is None:
            return None
        client, client_request_id, engine = ended
        if self.tracks_load:
            self.routing_policy.on_finish(engine, request_id, generated)
        return client, client_request_id

    def fail(self, request_id: int, code: ErrorCode, text: str) -> None:
        """End a request with an ERROR to its client and free its state."""
        ended = self.free(request_id)
        if ended is not None:
            logger.warning("request %d failed: %s", request_id, text)
            self.send_error(ended[0], ended[1], code, text)

    def abort(self, request_id: int, code: ErrorCode | None = None, text: str = "") -> None:
        """ABORT a request on its engine and end it: with an ERROR ``code`` to its client, or
        (None: the client is gone) silently."""
        engine = self.requests.engine_of.get(request_id)
        if engine and self.speaks_ours(engine):  # None: ended; UNROUTED: no engine has it
            self.send_quietly(engine, encode([int(Headers.ABORT), request_id]))
        if code is None:
            self.free(request_id)
        else:
            self.fail(request_id, code, text)

    def all_acked(self, header: Headers) -> None:
        """Every live engine acknowledged PAUSE or STOP: tell every client and engine."""
        self.control.done(header)
        message = HEADER_ONLY[header]
        for client, dialect in list(self.clients.items()):
            if dialect is not Dialect.MEGATRON_019:  # 0.19 has no acks
                self.send(client, message)
        for identity in self.registry.order:
            if self.registry.engines[identity].dialect is not Dialect.MEGATRON_019:
                self.send(identity, message)
        if header == Headers.STOP_ACK:
            self._running = False

    # ------------------------------------------------------------------ timers

    def _poll_items(self) -> list[tuple[Any, int]]:
        items: list[tuple[Any, int]] = [
            (self.router_socket, zmq.POLLIN),
            (self.monitor.socket, zmq.POLLIN),
        ]
        if self.shutdown.wake_r is not None:
            items.append((self.shutdown.wake_r.fileno(), zmq.POLLIN))
        return items

    def _poll_timeout_ms(self) -> int:
        """Milliseconds until the next deadline (-1: none, block until a message)."""
        deadlines = [
            self.requests.deadlines.next_deadline(),
            self.registry.next_deadline(),
            self.shutdown.next_deadline(),
            min(self.requests.orphans.values(), default=None),
        ]
        upcoming = [d for d in deadlines if d is not None]
        if not upcoming:
            return -1
        return max(0, int((min(upcoming) - time.monotonic()) * 1000) + 1)

    def _after_wakeup(self, monitor_ready: bool) -> None:
        """Everything not driven by a message: closed connections, silence, deadlines."""
        now = self.now
        if monitor_ready or self.monitor.pending:
            for identity in self.monitor.disconnected():
                if identity in self.registry.engines:
                    self.engine_handlers.engine_gone(identity, "the engine's connection closed")
                elif identity in self.clients:
                    self.client_handlers.client_gone(identity)
        for identity in self.registry.silent(now):
            self.engine_handlers.engine_gone(
                identity, f"no message from the engine for {self.engine_timeout:g} s"
            )
        if self.limits.request_timeout is not None:
            engine_of = self.requests.engine_of
            for request_id in self.requests.deadlines.expired(now, engine_of):
                self.abort(
                    request_id,
                    ErrorCode.TIMEOUT,
                    f"no result within the request timeout ({self.limits.request_timeout:g} s); "
                    "aborted",
                )
            self.requests.deadlines.compact(engine_of)
        if self.requests.orphans:
            self.engine_handlers.expire_orphans(now)
        if self.gone_clients:
            gone, self.gone_clients = self.gone_clients, set()
            for identity in gone:
                self.client_handlers.client_gone(identity)
        if self.shutdown.begin():
            logger.warning(
                "shutting down: %d request(s) in flight get %g s to finish",
                len(self.requests),
                self.shutdown.grace_s,
            )
        if self.shutdown.deadline is not None and (
            not self.requests or now >= self.shutdown.deadline
        ):
            for request_id in list(self.requests.engine_of):
                self.abort(request_id, ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
            if self.shutdown.start_stop_round():
                self._stop_engines()
            elif self.shutdown.finished(now):
                self._running = False

    def _stop_engines(self) -> None:
        """The drain is over: STOP every engine (unless a client's STOP already went out);
        all_acked ends the loop once they all acked, ``finished`` if they never do."""
        if self.control.stopping:
            return
        self.control.relay(Headers.STOP)
        self.control.relayed_019(Headers.STOP)
        for identity in self.registry.order:
            self.send_control(identity, Headers.STOP)
        if not self.awaited_from(Headers.STOP_ACK):  # nobody to wait for
            self.all_acked(Headers.STOP_ACK)

    # ------------------------------------------------------------------ debug view

    def map_sizes(self) -> dict[str, int]:
        """Sizes of every per-request and per-peer map (all 0 / engines-only when idle)."""
        sizes = self.requests.sizes()
        sizes["pending"] = len(self.client_handlers.pending)
        sizes.update(self.monitor.sizes)
        return sizes
