"""The data-parallel inference coordinator: one ROUTER between clients and engines.

Process and protocol are in DESIGN.md; this module adds what Megatron-core 0.16's coordinator
leaves out: every frame is validated, bad input is answered (or, for peers that only speak
Megatron's protocol, logged) and never stops the loop, and the loop drains every ready frame per
wake-up so the per-message Python work stays small.

Choices documented here (the contracts others rely on):

* Engine registration: one empty frame (Megatron: identity ``b"mp-coord-<dp_rank>"``, whose rank
  is parsed for ``deterministic_mode``) or ``[REGISTER, {"data_parallel_rank": int, "protocol":
  int}]`` (ours). The coordinator replies nothing to a registration. Frames from clients that
  arrive while engines register are queued (bounded) and handled once serving starts.
* Clients that sent ``[CONNECT, {"protocol": n}]`` are "ours" and receive ``[ERROR,
  client_request_id | None, code, message]`` for bad input. Clients that sent Megatron's bare
  ``[CONNECT]`` never receive a header >= 100 (Megatron's client would crash); their errors are
  only logged. A sender that never sent CONNECT (and is no engine) is answered with ERROR
  ``not_connected``: Megatron's client always handshakes first, so it never sees this.
* Engines that registered with REGISTER get ERROR messages for bad frames; Megatron engines
  never do.
* Replies for requests that streamed (``streaming_interval`` > 0) are relayed as ``[PARTIAL_REPLY,
  client_request_id, new_token_ids, new_text]`` with text held back while it ends in an
  incomplete multi-byte character.
* The ROUTER is ROUTER_MANDATORY with no send high-water mark: a reply to a client that has gone
  is dropped (logged), and a slow client never blocks the loop or loses a reply.
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Annotated, Any

import msgspec
import zmq

from ..auth import ServerAuth, check_bind
from ..protocol import (
    CONTROL_SIGNALS,
    DEFAULT_MAX_MESSAGE_BYTES,
    ErrorCode,
    Headers,
    ProtocolError,
    decode,
)
from ..sampling_params import validate_sampling_params
from ..tokenizer import as_megatron_tokenizer, tokenize_batch
from .elastic import ElasticMixin
from .routing import make_policy

logger = logging.getLogger("megatron_coord.coordinator")

_encode = msgspec.msgpack.Encoder().encode
_any_decoder = msgspec.msgpack.Decoder()
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
# Typed decoders validate the shape of the hot messages in C. The prompt and sampling params of
# a SUBMIT_REQUEST stay raw msgpack so a token prompt is forwarded without re-encoding.
_submit_decoder = msgspec.msgpack.Decoder(tuple[int, int | str, msgspec.Raw, msgspec.Raw])
_prompt_decoder = msgspec.msgpack.Decoder(str | list[NonNegInt])
_token_list_decoder = msgspec.msgpack.Decoder(list[NonNegInt])
_reply_decoder = msgspec.msgpack.Decoder(tuple[int, list[dict[str, Any]]])
_partial_decoder = msgspec.msgpack.Decoder(tuple[int, list[tuple[int, list[NonNegInt]]]])
_engine_error_decoder = msgspec.msgpack.Decoder(tuple[int, int, str, str])
_heartbeat_decoder = msgspec.msgpack.Decoder(tuple[int, dict[str, Any]])
_client_id_decoder = msgspec.msgpack.Decoder(tuple[int, int | str])
# msgspec raises UnicodeDecodeError, not a MsgspecError, for a str that is not UTF-8.
_DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError)
_MEGATRON_IDENTITY = re.compile(rb"^mp-coord-(\d+)$")

_HEADER_ONLY = {h: _encode([int(h)]) for h in Headers}
_CLIENT_CONTROL = frozenset(map(int, CONTROL_SIGNALS))
_MAX_EARLY_FRAMES = 65536
# pyzmq's Cython socket methods, bypassing its Python wrappers on the hot path (ints, not enums).
_zmq_send = zmq.backend.Socket.send
_zmq_recv = zmq.backend.Socket.recv
_zmq_get = zmq.backend.Socket.get
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_SAMPLING_CACHE_SIZE = 1024
_REPLACEMENT = "\ufffd"


def _peek_header(payload: bytes) -> int:
    """The header of a msgpack ``[header, ...]`` frame without decoding it (-1 if unusual).

    Every valid message is a fixarray (<= 15 fields) whose first element is a positive fixint
    (all header values are < 128), so two byte reads classify it; anything else takes the slow,
    fully validating path.
    """
    if len(payload) >= 2 and 0x91 <= payload[0] <= 0x9F and payload[1] < 0x80:
        return payload[1]
    return -1


def _describe(payload: bytes) -> ProtocolError:
    """Why a frame that failed the fast path is bad (for the ERROR reply)."""
    try:
        header = decode(payload)[0]
    except ProtocolError as exc:
        return exc
    return ProtocolError(ErrorCode.UNKNOWN_HEADER, f"unknown header {int(header)}")


def _client_request_id_of(payload: bytes) -> Any:
    """Best-effort client_request_id of a rejected message, so the client can match the error."""
    try:
        message = _any_decoder.decode(payload)
    except _DECODE_ERRORS:
        return None
    if isinstance(message, list) and len(message) > 1 and type(message[1]) in (int, str):
        return message[1]
    return None


def _tokens_of(value: Any) -> list[int]:
    """Token ids from a plain list or Megatron's serialized tensor ``["tensor", [ids]]``.

    Checked in C (``min``) rather than per element in Python, which cost more than everything
    else a reply needs; non-integer ids are refused by the detokenizer, whose errors fail only
    the request that carried them.
    """
    if value.__class__ is list and len(value) == 2 and value[0] == "tensor":
        value = value[1]
    if value.__class__ is not list:
        raise ProtocolError(ErrorCode.MALFORMED, "token ids must be a list")
    try:
        if value and min(value) < 0:
            raise ProtocolError(ErrorCode.MALFORMED, "token ids must be non-negative")
    except TypeError:
        raise ProtocolError(ErrorCode.MALFORMED, "token ids must be integers") from None
    return value


def _batch_detokenizer(tokenizer: Any):
    """One call that detokenizes many token lists (a single Rust call for HF tokenizers)."""
    batch = getattr(tokenizer, "detokenize_batch", None)
    if batch is not None:
        return batch
    detokenize = tokenizer.detokenize
    return lambda token_lists: [detokenize(tokens) for tokens in token_lists]


class _Engine:
    """What the coordinator knows about one registered engine (TP-coordinator)."""

    __slots__ = ("identity", "data_parallel_rank", "ours", "arrival", "load", "info")

    def __init__(self, identity: bytes, rank: int | None, ours: bool, arrival: int) -> None:
        self.identity = identity
        self.data_parallel_rank = rank
        self.ours = ours
        self.arrival = arrival
        self.load: dict[str, Any] | None = None  # last HEARTBEAT report


class _Stream:
    """Incremental detokenization state of one streaming request (never splits a character)."""

    __slots__ = ("tokens", "prefix_offset", "read_offset")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, detokenize: Any, new_tokens: list[int]) -> str:
        """Append tokens; return the newly completed text (held back while it ends in U+FFFD)."""
        self.tokens.extend(new_tokens)
        prefix = detokenize(self.tokens[self.prefix_offset : self.read_offset])
        text = detokenize(self.tokens[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(_REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return text[len(prefix) :]
        return ""


class DataParallelInferenceCoordinator(ElasticMixin):
    """Routes requests from clients to data-parallel engines and their results back.

    Binds a ROUTER (``host`` option, 127.0.0.1 by default; a port in use falls back to a random
    port with a warning), sends its address through ``pipe_connection`` and blocks until
    ``data_parallel_size`` engines have registered. ``start()`` then serves until every engine
    acknowledged a STOP.

    Options (keyword, all optional): ``host``, ``max_message_bytes`` (ZMQ_MAXMSGSIZE),
    ``routing`` ("round_robin", the default, or "least_loaded": see routing.py), ``log_level``,
    ``registration_timeout`` (seconds, None = wait forever, as Megatron does). ``data_parallel_size=0``: serve at once and let engines join and
    leave at any time (the standalone coordinator).

    Fault and security options (elastic.py, limits.py, auth.py): ``engine_timeout`` (seconds
    of silence before an engine of ours is dead, 3), ``max_outstanding`` and
    ``max_outstanding_per_engine`` (``overloaded`` past them), ``request_timeout`` (seconds,
    None), ``shutdown_grace`` (seconds in-flight requests get after SIGTERM/SIGINT, 10),
    ``auth_keys`` (CURVE key directory), ``insecure_no_auth`` (a non-loopback bind without
    keys, with a loud warning).
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
        self._init_elastic(options)
        max_message_bytes = options.pop("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        routing = options.pop("routing", "round_robin")
        log_level = options.pop("log_level", None)
        registration_timeout = options.pop("registration_timeout", None)
        if options:
            raise TypeError(f"unknown coordinator options: {sorted(options)}")
        if log_level is not None:
            logger.setLevel(log_level)

        self.data_parallel_size = data_parallel_size
        self.deterministic_mode = deterministic_mode
        self.tokenizer = as_megatron_tokenizer(tokenizer)
        self._detokenize_batch = _batch_detokenizer(self.tokenizer)
        self.max_message_bytes = max_message_bytes

        check_bind(host, auth_keys, insecure_no_auth)
        self.context = zmq.Context()
        self._auth = ServerAuth(self.context, auth_keys) if auth_keys is not None else None
        self.router_socket = self._bind(host, inference_coordinator_port, max_message_bytes)
        self._start_monitor()
        self.addr = self.router_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if pipe_connection is not None:
            pipe_connection.send(self.addr)
            pipe_connection.close()

        self.request_id_to_client_id: dict[int, bytes] = {}
        self.request_id_to_client_request_id: dict[int, Any] = {}
        self.next_request_id = 0
        self.engines: dict[bytes, _Engine] = {}
        self.clients: dict[bytes, bool] = {}  # identity -> speaks our protocol
        self._request_engine: dict[int, bytes] = {}
        self._inflight: dict[tuple[bytes, Any], int] = {}
        self._prompt_text: dict[int, str] = {}
        self._streams: dict[int, _Stream] = {}
        self._pending: list[list[Any]] = []  # submits of this wake-up, sent in one flush
        self._sampling_cache: dict[bytes, tuple[msgspec.Raw, bool]] = {}
        self._pause_acks: set[bytes] = set()
        self._stop_acks: set[bytes] = set()
        self._early_frames: list[tuple[list[bytes], int | None]] = []
        self._acks_done: set[Headers] = set()  # PAUSE/STOP acknowledged by every engine
        self._running = False
        self._stopping = False  # STOP was relayed: engines accept nothing but STOP_ACK now

        logger.info("coordinator at %s: waiting for %d engine(s)", self.addr, data_parallel_size)
        self._register_engines(registration_timeout)
        order = sorted(self.engines.values(), key=self._engine_order_key)
        self.identities_of_data_parallel_ranks: deque[bytes] = deque(e.identity for e in order)
        self.routing_policy = make_policy(
            routing, self.identities_of_data_parallel_ranks, deterministic=deterministic_mode
        )
        self._tracks_load = self.routing_policy.tracks_load
        logger.info("coordinator: %d engine(s) registered", len(self.engines))

    # ------------------------------------------------------------------ setup

    def _bind(self, host: str, port: int | None, max_message_bytes: int) -> zmq.Socket:
        """Bind the ROUTER; a port in use falls back to a random one with a warning."""
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.LINGER, 1000)
        if self._auth is not None:
            self._auth.apply(sock)
        if port is not None:
            try:
                sock.bind(f"tcp://{host}:{port}")
                return sock
            except zmq.ZMQError as exc:
                if exc.errno != errno.EADDRINUSE:
                    sock.close(0)
                    raise
                logger.warning("port %d is in use; binding a random port instead", port)
        sock.bind_to_random_port(f"tcp://{host}")
        return sock

    def _engine_order_key(self, engine: _Engine) -> tuple:
        if self.deterministic_mode:
            rank = engine.data_parallel_rank
            return (rank is None, rank if rank is not None else 0, engine.arrival)
        return (engine.arrival,)

    def _register_engines(self, timeout: float | None) -> None:
        """Block until data_parallel_size engines registered; queue client frames meanwhile."""
        sock = self.router_socket
        while len(self.engines) < self.data_parallel_size:
            if timeout is not None and not sock.poll(int(timeout * 1000)):
                raise TimeoutError(
                    f"only {len(self.engines)} of {self.data_parallel_size} engines registered "
                    f"within {timeout} s"
                )
            parts = sock.recv_multipart(copy=False)
            self._stranger_fd = parts[-1].get(zmq.SRCFD)  # learned by the registration
            frames = [part.bytes for part in parts]
            if len(frames) == 2 and self._try_register(frames[0], frames[1]):
                continue
            if len(self._early_frames) < _MAX_EARLY_FRAMES:
                self._early_frames.append((frames, self._stranger_fd))
            else:
                logger.warning("dropping a frame that arrived before engines registered")

    def _try_register(self, identity: bytes, payload: bytes) -> bool:
        """Register ``identity`` if ``payload`` is a registration; False if it is not one."""
        if payload == b"":
            match = _MEGATRON_IDENTITY.match(identity)
            rank = int(match.group(1)) if match else None
            return self._add_engine(identity, rank, ours=False)
        if _peek_header(payload) != Headers.REGISTER:
            return False
        try:
            _, info = _heartbeat_decoder.decode(payload)
            rank = info.get("data_parallel_rank")
            if rank is not None and (type(rank) is not int or rank < 0):
                raise ValueError("data_parallel_rank must be a non-negative integer")
        except (msgspec.MsgspecError, ValueError) as exc:
            logger.warning("bad registration from %r: %s", identity, exc)
            self._send_error(identity, None, ErrorCode.MALFORMED, f"bad REGISTER: {exc}")
            return True
        return self._add_engine(identity, rank, ours=True, info=info)

    def _add_engine(
        self, identity: bytes, rank: int | None, ours: bool, info: dict | None = None
    ) -> bool:
        if identity in self.engines:
            logger.warning("engine %r registered twice; ignoring the second registration", identity)
            return True
        if any(rank is not None and e.data_parallel_rank == rank for e in self.engines.values()):
            logger.warning("two engines claim data-parallel rank %s", rank)
        engine = _Engine(identity, rank, ours, len(self.engines) + self.engines_lost)
        engine.info = info
        self.engines[identity] = engine
        logger.info("engine %r registered (dp rank %s)", identity, rank)
        self._monitor.learn(identity, self._stranger_fd)  # to notice when its connection closes
        if hasattr(self, "routing_policy"):  # serving already: an engine joining
            self._join(identity)
        return True

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
        known = self._monitor.identity_to_fd  # peers whose connection is known: fast path
        self._running = True
        self._now = time.monotonic()
        early, self._early_frames = self._early_frames, []
        for frames, fd in early:
            self._stranger_fd = fd
            self._handle_frames(frames)
        self._flush()
        items = self._poll_items()
        monitor = self._monitor.socket
        while self._running:
            # Block until a frame, a monitor event, a signal or the next deadline (liveness,
            # request timeouts, shutdown grace): timers cost nothing while nothing is due.
            ready = zmq.zmq_poll(items, self._poll_timeout_ms())
            self._now = time.monotonic()
            if self._wake_r is not None:
                self._drain_wakeups()
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
            if self._pending:
                self._flush()
            self._after_wakeup(any(item[0] is monitor for item in ready))

    def _recv_stranger(self, sock: zmq.Socket) -> bytes:
        """The payload of a peer not known yet, noting its connection's file descriptor (read
        by the registration or CONNECT it may be, so a closed connection can be traced)."""
        frame = _zmq_recv(sock, _NOBLOCK, False)
        self._stranger_fd = frame.get(zmq.SRCFD)
        return frame.bytes

    @staticmethod
    def _rest(sock: zmq.Socket) -> list[bytes]:
        """The remaining frames of a multi-frame message (which is then refused)."""
        frames = [_zmq_recv(sock, 0)]
        while _zmq_get(sock, _RCVMORE):
            frames.append(_zmq_recv(sock, 0))
        return frames

    def stop(self) -> None:
        """Close the socket and the ZMQ context."""
        self._running = False
        self._close_elastic()
        if self._auth is not None:
            self._auth.stop()
        self.router_socket.close()
        self.context.term()

    def detokenize(self, finished_request_record: dict[str, Any]) -> None:
        """Fill ``generated_text`` (and ``prompt`` where it is None) of a record, in place."""
        self._detokenize_records([finished_request_record])

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

    # ------------------------------------------------------------------ dispatch

    def _handle_frames(self, frames: list[bytes]) -> None:
        """Act on a ROUTER message given as a frame list (queued early, or multi-frame)."""
        if len(frames) == 2:
            self._handle(frames[0], frames[1])
            return
        identity = frames[0]
        logger.warning("message of %d frames from %r (expected 1)", len(frames) - 1, identity)
        self._send_error(identity, None, ErrorCode.MALFORMED, "a message must be one frame")

    def _handle(self, identity: bytes, payload: bytes) -> None:
        """Act on one ROUTER message; every failure is contained here."""
        header = _peek_header(payload)
        try:
            engine = self.engines.get(identity)
            if engine is not None:
                self._handle_engine(engine, header, payload)
            elif identity in self.clients:
                self._handle_client(identity, header, payload)
            else:
                self._handle_stranger(identity, header, payload)
        except ProtocolError as exc:
            logger.warning("rejected a message from %r: %s", identity, exc)
            self._send_error(identity, _client_request_id_of(payload), exc.code, str(exc))
        except Exception:  # never let one message stop the coordinator
            logger.exception("internal error handling a message from %r", identity)
            self._send_error(identity, None, ErrorCode.MALFORMED, "internal error")

    def _handle_client(self, identity: bytes, header: int, payload: bytes) -> None:
        if header == 3:
            self._on_submit(identity, payload)
        elif header in _CLIENT_CONTROL:
            self._check_header_only(payload)
            self._flush()
            self._on_control(Headers(header))
        elif header == 1:
            self._on_connect(identity, payload)
        elif header == Headers.ABORT:
            self._flush()
            self._on_abort(identity, payload)
        elif header == Headers.STATS:
            self._check_header_only(payload)
            self._flush()
            self._on_stats(identity)
        elif header == -1:
            raise _describe(payload)
        elif header in Headers._value2member_map_:
            raise ProtocolError(
                ErrorCode.UNKNOWN_HEADER, f"{Headers(header).name} is not a client message"
            )
        else:
            raise ProtocolError(ErrorCode.UNKNOWN_HEADER, f"unknown header {header}")

    def _handle_engine(self, engine: _Engine, header: int, payload: bytes) -> None:
        self._heard_from(engine)
        if header == 4:
            self._on_engine_reply(engine, payload)
        elif header == Headers.PARTIAL_REPLY:
            self._on_partial_reply(engine, payload)
        elif header == 6 or header == 11:
            self._check_header_only(payload)
            self._on_ack(engine, Headers(header))
        elif header == Headers.ERROR:
            self._on_engine_error(engine, payload)
        elif header == Headers.HEARTBEAT:
            _, engine.load = self._decode(_heartbeat_decoder, payload)
            self._on_heartbeat(engine)
            if self._tracks_load:
                self.routing_policy.on_load_report(engine.identity, engine.load)
        elif payload == b"" or header == Headers.REGISTER:
            logger.warning("engine %r registered again; ignored", engine.identity)
        elif header == -1:
            raise _describe(payload)
        else:
            raise ProtocolError(
                ErrorCode.UNKNOWN_HEADER, f"header {header} is not an engine message"
            )

    def _handle_stranger(self, identity: bytes, header: int, payload: bytes) -> None:
        if header == 1:
            self._on_connect(identity, payload)
        elif payload == b"" or header == Headers.REGISTER:
            self._try_register(identity, payload)  # an engine joining (or coming back)
        elif header == Headers.HEARTBEAT and self._was_declared_dead(identity):
            # An engine of ours that was declared dead (silent too long) but lives: take it back.
            _, info = self._decode(_heartbeat_decoder, payload)
            rank = info.get("data_parallel_rank")
            rank = rank if type(rank) is int and rank >= 0 else None
            logger.warning("engine %r, declared dead, is alive: registering it again", identity)
            self._add_engine(identity, rank, ours=True, info=info)
            engine = self.engines[identity]
            engine.load = info
            self._on_heartbeat(engine)
        else:
            logger.warning("message from %r, which never sent CONNECT", identity)
            if header == -1:
                raise _describe(payload)
            raise ProtocolError(ErrorCode.NOT_CONNECTED, "send CONNECT before anything else")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _decode(decoder: msgspec.msgpack.Decoder, payload: bytes) -> Any:
        try:
            return decoder.decode(payload)
        except _DECODE_ERRORS as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad message: {exc}") from None

    @staticmethod
    def _check_header_only(payload: bytes) -> None:
        """Header-only messages are exactly one element: a fixarray of 1 and the header."""
        if payload[0] != 0x91 or len(payload) != 2:
            raise ProtocolError(ErrorCode.MALFORMED, "this message takes no fields")

    def _send(self, identity: bytes, payload: bytes) -> bool:
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
                self._gone_clients.add(identity)  # its requests are freed after this wake-up
            return False

    def _speaks_ours(self, identity: bytes) -> bool:
        engine = self.engines.get(identity)
        if engine is not None:
            return engine.ours
        return self.clients.get(identity, True)  # strangers never said CONNECT

    def _send_error(self, identity: bytes, client_request_id: Any, code: ErrorCode, text: str):
        """ERROR to ``identity`` if it speaks our protocol; Megatron peers only get the log."""
        if self._speaks_ours(identity):
            self._send(identity, _encode([int(Headers.ERROR), client_request_id, code.value, text]))

    def _free(self, request_id: int, generated: int | None = None) -> tuple[bytes, Any] | None:
        """Forget a request in every map; returns (client identity, client_request_id).

        ``generated``: tokens in its final record (for the routing policy's accounting)."""
        client = self.request_id_to_client_id.pop(request_id, None)
        if client is None:
            return None
        client_request_id = self.request_id_to_client_request_id.pop(request_id)
        engine = self._request_engine.pop(request_id)
        del self._inflight[(client, client_request_id)]
        self._prompt_text.pop(request_id, None)
        self._streams.pop(request_id, None)
        self._release(engine, request_id)
        if self._tracks_load:
            self.routing_policy.on_finish(engine, request_id, generated)
        return client, client_request_id

    # ------------------------------------------------------------------ client messages

    def _on_connect(self, identity: bytes, payload: bytes) -> None:
        message = self._decode(_any_decoder, payload)
        if len(message) == 1:
            ours = False
        elif (
            len(message) == 2
            and isinstance(message[1], dict)
            and type(message[1].get("protocol")) is int
        ):
            ours = True
        else:
            self.clients.setdefault(identity, False)  # never risk a header >= 100
            raise ProtocolError(ErrorCode.MALFORMED, 'CONNECT takes no fields or {"protocol": n}')
        if identity in self.clients:
            logger.info("client %r connected again", identity)
        else:
            self._monitor.learn(identity, self._stranger_fd)  # to notice when it vanishes
        self.clients[identity] = ours
        self._send(identity, _HEADER_ONLY[Headers.CONNECT_ACK])

    def _sampling_params(self, raw: msgspec.Raw) -> tuple[msgspec.Raw, bool, tuple]:
        """Validated sampling params as msgpack, whether they stream and the token budget
        (num_tokens_to_generate, num_tokens_total) for load-aware routing; cached by bytes.

        Clients repeat the same parameters, so validation runs once per distinct value."""
        key = bytes(raw)
        cached = self._sampling_cache.get(key)
        if cached is not None:
            return cached
        try:
            data = _any_decoder.decode(key)
        except _DECODE_ERRORS as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad sampling params: {exc}") from None
        clean_dict = validate_sampling_params(data)
        clean = (
            msgspec.Raw(_encode(clean_dict)),
            clean_dict.get("streaming_interval", 0) > 0,
            (clean_dict.get("num_tokens_to_generate", 30), clean_dict.get("num_tokens_total")),
        )
        if len(self._sampling_cache) >= _SAMPLING_CACHE_SIZE:
            self._sampling_cache.clear()
        self._sampling_cache[key] = clean
        return clean

    def _on_submit(self, client: bytes, payload: bytes) -> None:
        try:
            _, client_request_id, prompt_raw, sampling_raw = _submit_decoder.decode(payload)
        except _DECODE_ERRORS as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad SUBMIT_REQUEST: {exc}") from None
        if self._stopping:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the engines are stopping")
        key = (client, client_request_id)
        if key in self._inflight:
            raise ProtocolError(
                ErrorCode.DUPLICATE_REQUEST_ID,
                f"request id {client_request_id!r} is already in flight",
            )
        try:
            prompt = _prompt_decoder.decode(prompt_raw)
        except _DECODE_ERRORS as exc:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"prompt must be a string or a list of non-negative token ids: {exc}",
            ) from None
        if not prompt:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        sampling, streaming, budget = self._sampling_params(sampling_raw)

        engine = self._admit()  # no_engine / overloaded / shutting_down refuse it here
        request_id = self.next_request_id
        self.next_request_id = request_id + 1
        self.request_id_to_client_id[request_id] = client
        self.request_id_to_client_request_id[request_id] = client_request_id
        self._request_engine[request_id] = engine
        self._inflight[key] = request_id
        self._admitted(engine, request_id)
        if prompt.__class__ is str:
            self._prompt_text[request_id] = prompt
            self._pending.append([engine, request_id, None, sampling, prompt])
        else:
            self._pending.append([engine, request_id, prompt_raw, sampling, None])
        if streaming:
            self._streams[request_id] = _Stream()
        if self._tracks_load:
            self._track_submit(engine, request_id, prompt, budget)

    def _track_submit(self, engine: bytes, request_id: int, prompt: Any, budget: tuple) -> None:
        """Tell a load-tracking policy the request's size (prompt and generation budget)."""
        to_generate, total = budget
        if total is not None:  # Megatron: num_tokens_total wins (text prompts: an upper bound)
            to_generate = max(0, total - len(prompt)) if prompt.__class__ is list else total
        self.routing_policy.on_submit(engine, request_id, prompt, to_generate)

    def _flush(self) -> None:
        """Send this wake-up's submits in order; text prompts are tokenized in one batch call."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        texts = [item for item in pending if item[2] is None]
        if texts:
            self._tokenize(texts)
            if self._tracks_load:
                for item in texts:
                    if item[2] is not None:
                        self.routing_policy.on_prompt_tokens(item[1], len(item[2]))
        send = self._send
        submit = int(Headers.SUBMIT_REQUEST)
        submitted = self._submitted  # kept until the request ends: resent if its engine dies
        request_engine = self._request_engine
        for item in pending:
            if item[2] is not None:  # None: tokenization failed, the client has its error
                submitted[item[1]] = item[2] = _encode((submit, item[1], item[2], item[3]))
        for engine, request_id, frame, _, _ in pending:
            # An engine found dead during this loop has had its requests moved or failed.
            moved = frame is None or request_engine.get(request_id) != engine
            if not moved and not send(engine, frame):
                self._engine_unreachable(engine, request_id)

    def _tokenize(self, items: list[list[Any]]) -> None:
        """Tokenize the text prompts of ``items`` in place (one call; per item on failure)."""
        texts = [item[4] for item in items]
        try:
            token_lists = tokenize_batch(self.tokenizer, texts)
        except Exception:
            token_lists = None
        for index, item in enumerate(items):
            try:
                tokens = (
                    token_lists[index]
                    if token_lists is not None
                    else self.tokenizer.tokenize(item[4])
                )
                if not tokens:
                    raise ValueError("the prompt tokenized to nothing")
                item[2] = list(tokens)
            except Exception as exc:
                self._fail(item[1], ErrorCode.INVALID_REQUEST, f"cannot tokenize the prompt: {exc}")

    def _fail(self, request_id: int, code: ErrorCode, text: str) -> None:
        """End a request with an ERROR to its client and free its state."""
        ended = self._free(request_id)
        if ended is not None:
            logger.warning("request %d failed: %s", request_id, text)
            self._send_error(ended[0], ended[1], code, text)

    def _on_control(self, header: Headers) -> None:
        """Relay PAUSE/UNPAUSE/SUSPEND/RESUME/STOP to every engine (nothing after a STOP:
        Megatron's engines assert that only STOP_ACK follows it)."""
        if self._stopping:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the engines are stopping")
        self._stopping = header == Headers.STOP
        self._note_control(header)  # engines that join later catch up (elastic.py)
        message = _HEADER_ONLY[header]
        for engine in self.identities_of_data_parallel_ranks:
            self._send(engine, message)
        if header == Headers.UNPAUSE:
            self._pause_acks.clear()
            self._acks_done.discard(Headers.PAUSE_ACK)
        elif header in (Headers.PAUSE, Headers.STOP):
            ack = Headers.PAUSE_ACK if header == Headers.PAUSE else Headers.STOP_ACK
            self._acks_done.discard(ack)
            if not self.identities_of_data_parallel_ranks:  # nobody to wait for
                self._all_acked(ack)

    def _on_abort(self, client: bytes, payload: bytes) -> None:
        _, client_request_id = self._decode(_client_id_decoder, payload)
        request_id = self._inflight.get((client, client_request_id))
        if request_id is None:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"no request {client_request_id!r} is in flight"
            )
        self._send(self._request_engine[request_id], _encode([int(Headers.ABORT), request_id]))

    def _on_stats(self, client: bytes) -> None:
        """Answer STATS (health checks, metrics): each replica's liveness and outstanding load."""
        if not self.clients.get(client):
            raise ProtocolError(ErrorCode.UNKNOWN_HEADER, "STATS needs our protocol (CONNECT)")
        engines = [
            {
                "data_parallel_rank": engine.data_parallel_rank,
                "alive": True,  # an engine declared dead leaves the list (elastic.py)
                "outstanding_requests": self._engine_requests.get(engine.identity, 0),
                "outstanding_tokens": self._outstanding_tokens(engine.identity),
                "load": engine.load,
                "identity": engine.identity.hex(),
                "info": engine.info,
            }
            for engine in (self.engines[i] for i in self.identities_of_data_parallel_ranks)
        ]
        stats = {
            "engines": engines,
            "requests_in_flight": len(self._request_engine),
            "clients": len(self.clients),
            "engines_lost": self.engines_lost,
            "requests_resubmitted": self.requests_resubmitted,
            "shutting_down": self._shutdown_deadline is not None,
            "maps": self._map_sizes(),  # every per-request map: all 0 when nothing is in flight
        }
        self._send(client, _encode([int(Headers.STATS), stats]))

    def _outstanding_tokens(self, identity: bytes) -> int | None:
        """The routing policy's view of an engine's outstanding work (None: it keeps none)."""
        load = getattr(self.routing_policy, "load", None)
        if load is None or identity not in self.routing_policy.engines:
            return None
        return load(identity)

    # ------------------------------------------------------------------ engine messages

    def _on_ack(self, engine: _Engine, header: Headers) -> None:
        """Count PAUSE_ACK/STOP_ACK; once every engine acked, tell every client and engine."""
        acks = self._pause_acks if header == Headers.PAUSE_ACK else self._stop_acks
        if engine.identity in acks:
            logger.warning("engine %r acked %s twice", engine.identity, header.name)
            return
        acks.add(engine.identity)
        if header in self._acks_done or not set(self.identities_of_data_parallel_ranks) <= acks:
            return
        self._all_acked(header)

    def _all_acked(self, header: Headers) -> None:
        """Every live engine acknowledged PAUSE or STOP: tell every client and engine."""
        self._acks_done.add(header)
        message = _HEADER_ONLY[header]
        for client in list(self.clients):
            self._send(client, message)
        for identity in self.identities_of_data_parallel_ranks:
            self._send(identity, message)
        if header == Headers.STOP_ACK:
            self._running = False

    def _on_engine_reply(self, engine: _Engine, payload: bytes) -> None:
        _, records = self._decode(_reply_decoder, payload)
        routed = []
        for record in records:
            try:
                requests = record["requests"]
                request_id = requests[0]["request_id"]
            except (KeyError, IndexError, TypeError):
                logger.warning(
                    "engine %r: a record without requests[0].request_id", engine.identity
                )
                continue
            if self._request_engine.get(request_id) != engine.identity:
                logger.warning(
                    "engine %r replied for request %r, which it does not hold; dropped",
                    engine.identity,
                    request_id,
                )
                continue
            routed.append((request_id, record))
        if not routed:
            return
        failed = self._detokenize_records([r for _, r in routed], strict=False)
        reply = int(Headers.ENGINE_REPLY)
        for index, (request_id, record) in enumerate(routed):
            if index in failed:
                self._fail(request_id, ErrorCode.ENGINE_FAILED, failed[index])
                continue
            generated = None
            if self._tracks_load:
                generated = len(_tokens_of(record["requests"][0]["generated_tokens"]))
            client, client_request_id = self._free(request_id, generated)
            self._send(client, _encode([reply, client_request_id, record]))

    def _detokenize_records(self, records: list[dict], strict: bool = True) -> dict[int, str]:
        """Fill generated_text and missing prompts of every request of ``records`` in one call.

        Returns {record index: reason} for records that could not be detokenized (with
        ``strict`` the first such reason raises ProtocolError instead).
        """
        jobs: list[tuple[int, dict, str]] = []
        token_lists: list[list[int]] = []
        failed: dict[int, str] = {}
        prompt_text = self._prompt_text
        for index, record in enumerate(records):
            try:
                for request in record["requests"]:
                    generated = _tokens_of(request["generated_tokens"])
                    if request.get("prompt") is None:
                        text = prompt_text.get(request.get("request_id"))
                        if text is not None:
                            request["prompt"] = text
                        else:
                            prompt_tokens = _tokens_of(request["prompt_tokens"])  # may raise:
                            jobs.append((index, request, "prompt"))  # then append nothing
                            token_lists.append(prompt_tokens)
                    jobs.append((index, request, "generated_text"))
                    token_lists.append(generated)
            except (KeyError, TypeError, ProtocolError) as exc:
                failed[index] = f"malformed engine reply: {exc!r}"
        texts = self._run_detokenizer(token_lists)
        for (index, request, field), text in zip(jobs, texts, strict=True):
            if isinstance(text, Exception):
                failed.setdefault(index, f"cannot detokenize: {text}")
            else:
                request[field] = text
        if strict and failed:
            raise ProtocolError(ErrorCode.MALFORMED, next(iter(failed.values())))
        return failed

    def _run_detokenizer(self, token_lists: list[list[int]]) -> list[Any]:
        """Batch-detokenize; on failure retry one by one so one bad list fails only itself."""
        if not token_lists:
            return []
        try:
            return list(self._detokenize_batch(token_lists))
        except Exception:
            results: list[Any] = []
            for tokens in token_lists:
                try:
                    results.append(self.tokenizer.detokenize(tokens))
                except Exception as exc:
                    results.append(exc)
            return results

    def _on_engine_error(self, engine: _Engine, payload: bytes) -> None:
        _, request_id, code, text = self._decode(_engine_error_decoder, payload)
        if self._request_engine.get(request_id) != engine.identity:
            logger.warning(
                "engine %r: ERROR for request %r it does not hold", engine.identity, request_id
            )
            return
        try:
            error_code = ErrorCode(code)
        except ValueError:
            error_code = ErrorCode.ENGINE_FAILED
        self._fail(request_id, error_code, text)

    def _on_partial_reply(self, engine: _Engine, payload: bytes) -> None:
        _, items = self._decode(_partial_decoder, payload)
        header = int(Headers.PARTIAL_REPLY)
        detokenize = self.tokenizer.detokenize
        for request_id, tokens in items:
            stream = self._streams.get(request_id)
            if stream is None or self._request_engine.get(request_id) != engine.identity:
                logger.warning("partial reply for request %r not streaming here", request_id)
                continue
            client = self.request_id_to_client_id[request_id]
            if self._tracks_load:
                self.routing_policy.on_tokens(engine.identity, request_id, len(tokens))
            try:
                text = stream.push(detokenize, tokens)
            except Exception as exc:
                self._fail(request_id, ErrorCode.ENGINE_FAILED, f"cannot detokenize: {exc}")
                continue
            if self.clients.get(client):  # only our clients understand PARTIAL_REPLY
                client_request_id = self.request_id_to_client_request_id[request_id]
                self._send(client, _encode([header, client_request_id, tokens, text]))
