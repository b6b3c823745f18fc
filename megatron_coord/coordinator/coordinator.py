"""The data-parallel inference coordinator: one ROUTER between clients and engines.

Process and protocol are in DESIGN.md. This module holds the class with Megatron's API, the
socket, the receiving loop and the dispatch of each frame to its handlers; it builds the parts
it is composed of and hands each only what it needs:

* ``CoordinatorOptions`` (options.py): the keyword options, checked before anything binds;
* ``CoordinatorState`` (state.py): what the parts share, the handlers' whole view: the
  ``RequestTable`` (requests.py), the ``EngineRegistry`` (engines.py), the ``PeerMonitor``
  (liveness.py), the ``ControlState`` (control.py), the ``GracefulShutdown`` (shutdown.py),
  ``Limits`` (limits.py), ``TextCodec`` (text.py), the routing policy (routing/), the clients,
  the settings and the wake-up's clock;
* ``Outbox`` (outbox.py): every send, in the peer's protocol;
* ``RequestEndings`` (endings.py): free / fail / abort; ``ControlRounds`` (control_rounds.py):
  relaying control signals and ending their rounds; ``Failover`` (failover.py): engine death;
* the handlers of client messages (client_handlers.py) and of engine messages
  (engine_handlers.py), each a table from header to handler; the latter answer registrations
  with REGISTER_ACK and adopt back what a returning replica holds (adoption.py), and let the
  first final result of a failed-over request win (first_result.py);
* ``AfterWakeup`` (after_wakeup.py): closed connections, silence, deadlines, shutdown.

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
from ..protocol import ErrorCode, Headers, ProtocolError
from .after_wakeup import AfterWakeup
from .client_handlers import ClientHandlers
from .control import ControlState
from .control_rounds import ControlRounds
from .dialects import Dialect, Wire019
from .endings import RequestEndings
from .engine_handlers import EngineHandlers
from .engines import EngineRegistry
from .failover import Failover
from .liveness import PeerMonitor
from .options import CoordinatorOptions, parse_options
from .outbox import Outbox
from .requests import RequestTable
from .routing import make_policy
from .shutdown import GracefulShutdown
from .state import CoordinatorState
from .text import TextCodec
from .weight_updates import WeightUpdates
from .wire import client_request_id_of, peek_header

logger = logging.getLogger("megatron_coord.coordinator")

_MAX_EARLY_FRAMES = 65536
# pyzmq's Cython socket methods, bypassing its Python wrappers on the hot path (ints, not enums).
_zmq_recv = zmq.backend.Socket.recv
_zmq_get = zmq.backend.Socket.get
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
        opts = parse_options(options)
        if opts.log_level is not None:
            logger.setLevel(opts.log_level)
        self.data_parallel_size = data_parallel_size
        self.deterministic_mode = deterministic_mode
        text = TextCodec(tokenizer)
        self.tokenizer = text.tokenizer
        registry = EngineRegistry(opts.engine_timeout, deterministic_mode)  # checks the timeout
        shutdown = GracefulShutdown(opts.shutdown_grace, stop_engines=opts.shutdown_stops_engines)
        self._early_frames: list[tuple[list[bytes], int | None]] = []

        check_bind(opts.host, opts.auth_keys, opts.insecure_no_auth)
        self.context = zmq.Context()
        self._auth: ServerAuth | None = None
        self.router_socket: zmq.Socket | None = None
        self.state: CoordinatorState | None = None
        try:  # a failure past this point closes what it opened (the port is free again)
            if opts.auth_keys is not None:
                self._auth = ServerAuth(self.context, opts.auth_keys)
            self.router_socket = self._bind(opts, inference_coordinator_port)
            self.state = CoordinatorState(
                requests=RequestTable(),
                registry=registry,
                control=ControlState(),
                shutdown=shutdown,
                monitor=PeerMonitor(self.router_socket, opts.engine_timeout),
                text=text,
                limits=opts.limits,
                data_parallel_size=data_parallel_size,
                megatron_engines=opts.megatron_engines,
                engine_timeout=opts.engine_timeout,
                failover_wait=opts.failover_wait,
                wait_for_engine=opts.wait_for_engine,
            )
            self.addr = self.router_socket.getsockopt_string(zmq.LAST_ENDPOINT)
            if pipe_connection is not None:
                pipe_connection.send(self.addr)
                pipe_connection.close()
            self._compose()
            logger.info(
                "coordinator at %s: waiting for %d engine(s)", self.addr, data_parallel_size
            )
            self._register_engines(opts.registration_timeout)
        except BaseException:
            self._close()
            raise
        self.state.registry.fix_order()
        self.state.route_with(
            make_policy(
                opts.routing,
                self.identities_of_data_parallel_ranks,
                deterministic=deterministic_mode,
                engine_info=lambda identity: self.state.registry.engines[identity].info,
                **opts.prefix_options,
            )
        )
        logger.info("coordinator: %d engine(s) registered", len(self.state.registry))

    def _compose(self) -> None:
        """Build the parts that act on the state, each given only what it uses; the handler
        sets depend on each other through the callables passed (clients before engines)."""
        state = self.state
        self.outbox = outbox = Outbox(self.router_socket, state.registry, state.clients)
        endings = RequestEndings(state, outbox)
        rounds = ControlRounds(state, outbox)
        failover = Failover(state, outbox, endings, rounds)
        self.client_handlers = client_handlers = ClientHandlers(
            state, outbox, endings, rounds, failover.engine_unreachable
        )
        self.engine_handlers = engine_handlers = EngineHandlers(
            state,
            outbox,
            endings,
            rounds,
            failover,
            client_handlers.on_connect,
            client_handlers.flush,
        )
        updates = WeightUpdates(state, outbox, engine_handlers.reroute)
        client_handlers.table[int(Headers.UPDATE_WEIGHTS)] = updates.on_update
        client_handlers.set_epoch = updates.set_epoch
        engine_handlers.table[int(Headers.UPDATE_WEIGHTS_DONE)] = updates.on_done
        self.after_wakeup = AfterWakeup(
            state, outbox, endings, rounds, failover, client_handlers.client_gone, updates
        )
        # bound once: _handle runs for every message
        self._engines = state.registry.engines
        self._clients = state.clients
        self._on_engine_message = engine_handlers.handle
        self._on_client_message = client_handlers.handle

    # ------------------------------------------------------------------ the seed's attributes

    @property
    def identities_of_data_parallel_ranks(self) -> deque[bytes]:
        """The engines that get requests, in routing order."""
        return self.state.registry.order

    @property
    def engines(self) -> dict[bytes, Any]:
        return self.state.registry.engines

    @property
    def request_id_to_client_id(self) -> dict[int, bytes]:
        return self.state.requests.client_of

    @property
    def request_id_to_client_request_id(self) -> dict[int, Any]:
        return self.state.requests.client_request_id_of

    @property
    def next_request_id(self) -> int:
        return self.state.requests.next_request_id

    @property
    def engines_lost(self) -> int:
        return self.state.registry.engines_lost

    # ------------------------------------------------------------------ setup

    def _bind(self, opts: CoordinatorOptions, port: int | None) -> zmq.Socket:
        """Bind the ROUTER; a port in use falls back to a random one with a warning (the
        seed's behaviour), or with ``strict_port`` raises ConfigurationError naming its holder."""
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, opts.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 1000)
        if self._auth is not None:
            self._auth.apply(sock)
        host = opts.host
        if port:  # None or 0: any free port
            try:
                sock.bind(f"tcp://{host}:{port}")
                return sock
            except zmq.ZMQError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                if not in_use or opts.strict_port:
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
        state = self.state
        while len(state.registry) < self.data_parallel_size:
            if timeout is not None and not sock.poll(int(timeout * 1000)):
                raise TimeoutError(
                    f"only {len(state.registry)} of {self.data_parallel_size} engines "
                    f"registered within {timeout} s"
                )
            parts = sock.recv_multipart(copy=False)
            state.stranger_fd = parts[-1].get(zmq.SRCFD)  # learned by the registration
            frames = [part.bytes for part in parts]
            if len(frames) == 2 and self.engine_handlers.try_register(frames[0], frames[1]):
                continue
            if len(self._early_frames) < _MAX_EARLY_FRAMES:
                self._early_frames.append((frames, state.stranger_fd))
            else:
                logger.warning("dropping a frame that arrived before engines registered")

    # ------------------------------------------------------------------ public API

    def get_next_data_parallel_rank(self) -> bytes:
        """The ZMQ identity of the engine that gets the next request (the routing policy's pick)."""
        return self.state.routing_policy.choose()

    def start(self) -> None:
        """Serve until every engine acknowledged STOP. Drains every ready frame per wake-up.

        Frames are read with the Cython socket methods directly: pyzmq's Python wrappers
        (recv_multipart/send_multipart) cost 3-4x more per message than the frames themselves.
        """
        state = self.state
        sock = self.router_socket
        recv = _zmq_recv
        rcvmore = _zmq_get
        handle = self._handle
        known = state.monitor.identity_to_fd  # peers whose connection is known: fast path
        flush = self.client_handlers.flush
        poll_timeout_ms = self.after_wakeup.poll_timeout_ms
        after_wakeup = self.after_wakeup.run
        shutdown = state.shutdown
        state.running = True
        state.now = time.monotonic()
        early, self._early_frames = self._early_frames, []
        for frames, fd in early:
            state.stranger_fd = fd
            self._handle_frames(frames)
        flush()
        items = self._poll_items()
        monitor = state.monitor.socket
        while state.running:
            # Block until a frame, a monitor event, a signal or the next deadline (liveness,
            # request timeouts, shutdown grace): timers cost nothing while nothing is due.
            ready = zmq.zmq_poll(items, poll_timeout_ms())
            state.now = time.monotonic()
            if shutdown.wake_r is not None:
                shutdown.drain_wakeups()
            try:
                while state.running:
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
            after_wakeup(any(item[0] is monitor for item in ready))

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful shutdown (main thread only)."""
        self.state.shutdown.install_signal_handlers()

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown at the next wake-up (safe from a signal handler)."""
        self.state.shutdown.request()

    def stop(self) -> None:
        """Close the socket and the ZMQ context."""
        self.state.running = False
        self._close()

    def _close(self) -> None:
        """Close every socket, then the context (explicitly: a context left to the garbage
        collector can be destroyed before its sockets, and then blocks forever)."""
        if self.state is not None:
            self.state.shutdown.close()
            self.state.monitor.close()
        if self._auth is not None:
            self._auth.stop()
        if self.router_socket is not None:
            self.router_socket.close()
        self.context.term()

    def detokenize(self, finished_request_record: dict[str, Any]) -> None:
        """Fill ``generated_text`` (and ``prompt`` where it is None) of a record, in place."""
        state = self.state
        state.text.detokenize_records([finished_request_record], state.requests.prompt_text)

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
        self.state.stranger_fd = frame.get(zmq.SRCFD)
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
        self.outbox.send_error(identity, None, ErrorCode.MALFORMED, "a message must be one frame")

    def _handle(self, identity: bytes, payload: bytes) -> None:
        """Act on one ROUTER message; every failure is contained here."""
        header = peek_header(payload)
        try:
            engine = self._engines.get(identity)
            if engine is not None:
                self._on_engine_message(engine, header, payload)
            elif identity in self._clients:
                self._on_client_message(identity, header, payload)
            else:
                self.engine_handlers.handle_stranger(identity, header, payload)
        except ProtocolError as exc:
            logger.warning("rejected a message from %r: %s", identity, exc)
            self.outbox.send_error(
                identity, self._request_refused(identity, header, payload, exc), exc.code, str(exc)
            )
        except Exception:  # never let one message stop the coordinator
            logger.exception("internal error handling a message from %r", identity)
            self.outbox.send_error(identity, None, ErrorCode.MALFORMED, "internal error")

    def _request_refused(
        self, identity: bytes, header: int, payload: bytes, exc: ProtocolError
    ) -> Any:
        """The client_request_id a refusal answers (best effort), None if it answers none.

        A 0.19 client is answered only for a submit it awaits no other answer for: its
        client resolves the awaited request with any reply and fails on a reply it awaits none
        for, so a refused duplicate id or a bad control message gets no reply at all."""
        if self._clients.get(identity) is Dialect.MEGATRON_019 and (
            header != Wire019.SUBMIT_REQUEST or exc.code is ErrorCode.DUPLICATE_REQUEST_ID
        ):
            return None
        return client_request_id_of(payload)

    # ------------------------------------------------------------------ polling

    def _poll_items(self) -> list[tuple[Any, int]]:
        items: list[tuple[Any, int]] = [
            (self.router_socket, zmq.POLLIN),
            (self.state.monitor.socket, zmq.POLLIN),
        ]
        if self.state.shutdown.wake_r is not None:
            items.append((self.state.shutdown.wake_r.fileno(), zmq.POLLIN))
        return items
