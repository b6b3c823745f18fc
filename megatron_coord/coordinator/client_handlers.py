"""What the coordinator does with each message from a client: the table from header to handler.

A handler validates its message before acting on it and raises ``ProtocolError`` for bad input
(the coordinator answers it). Submits are admitted one by one but sent in one ``flush`` per
wake-up, so text prompts are tokenized in a single call; control, abort and stats messages
flush first, so they act after every submit that arrived before them.

A Megatron-core 0.19 client (CONNECT ``[0]``) has its own table of 0.19's header values
(dialects.py): the same handlers, plus SHUTDOWN (a graceful shutdown of the coordinator) and the
signals only 0.19 engines know (SET_GENERATION_EPOCH, the CUDA profiler), relayed to those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec

from ..liveness_contract import client_cadence
from ..protocol import CONTROL_SIGNALS, ErrorCode, Headers, ProtocolError
from ..sampling_params import validate_sampling_params
from .control_rounds import ControlRounds
from .dialects import BROADCAST_019, CONTROL_FROM_019, Dialect, Wire019
from .endings import RequestEndings
from .outbox import Outbox
from .requests import ROUTE_LATER, UNROUTED
from .state import CoordinatorState
from .wire import (
    DECODE_ERRORS,
    HEADER_ONLY,
    any_decoder,
    check_header_only,
    client_id_decoder,
    decode_as,
    encode,
    peek_header,
    prompt_decoder,
    submit_decoder,
    unexpected,
)

logger = logging.getLogger("megatron_coord.coordinator")

_SAMPLING_CACHE_SIZE = 1024
_HEARTBEAT_REPLY = encode([int(Headers.HEARTBEAT), {}])
_CONNECT_ACK_019 = encode([int(Wire019.CONNECT_ACK)])
epoch_decoder = msgspec.msgpack.Decoder(tuple[int, int])


class ClientHandlers:
    """Handlers of client messages, and the submits of the current wake-up.

    ``engine_unreachable(engine, request_id)`` is told of a submit that found its engine gone
    (failover.py)."""

    def __init__(
        self,
        state: CoordinatorState,
        outbox: Outbox,
        endings: RequestEndings,
        rounds: ControlRounds,
        engine_unreachable: Callable[[bytes, int], None],
    ) -> None:
        self.state = state
        self._send = outbox.send
        self._send_submit = outbox.send_submit
        self._fail = endings.fail
        self._abort = endings.abort
        self._rounds = rounds
        self._engine_unreachable = engine_unreachable
        self.pending: list[list[Any]] = []  # [engine, request id, prompt, params, text]
        # Requests of a policy that routes by tokens (ROUTE_LATER): (pending item, prompt,
        # token budget), routed in flush once tokenized.
        self.later: list[tuple[list[Any], str | list[int], int]] = []
        self._sampling_cache: dict[bytes, tuple[msgspec.Raw, bool, tuple]] = {}
        self.set_epoch: Callable[[int], None] | None = None  # weight_updates.py's
        self.table = {
            int(Headers.SUBMIT_REQUEST): self.on_submit,
            int(Headers.CONNECT): self.on_connect,
            int(Headers.ABORT): self.on_abort,
            int(Headers.STATS): self.on_stats,
            int(Headers.HEARTBEAT): self.on_heartbeat,
        }
        for header in CONTROL_SIGNALS:
            self.table[int(header)] = lambda client, payload, h=header: self.on_control(
                h, client, payload
            )
        self.table_019 = {
            int(Wire019.SUBMIT_REQUEST): self.on_submit,
            int(Wire019.CONNECT): self.on_connect,
            int(Wire019.SHUTDOWN): self.on_shutdown,
        }
        for value, header in CONTROL_FROM_019.items():
            self.table_019[value] = lambda client, payload, h=header: self.on_control(
                h, client, payload
            )
        for value in BROADCAST_019:
            self.table_019[value] = self.on_broadcast_019

    def handle(self, client: bytes, header: int, payload: bytes) -> None:
        if self.state.clients[client] is Dialect.MEGATRON_019:
            handler = self.table_019.get(header)
        else:
            handler = self.table.get(header)
        if handler is None:
            raise unexpected(header, payload, "client")
        handler(client, payload)

    # ------------------------------------------------------------------ handshake

    def on_connect(self, identity: bytes, payload: bytes) -> None:
        """CONNECT: ``[1]`` (Megatron 0.16's client), ``[1, {"protocol": n}]`` (ours) or
        ``[0]`` (Megatron 0.19's), each answered with its own CONNECT_ACK. A client of ours
        that pings says its settings, and its CONNECT_ACK says the cadence to ping at
        (liveness_contract.py)."""
        state = self.state
        ack = HEADER_ONLY[Headers.CONNECT_ACK]
        message = decode_as(any_decoder, payload)
        if message == [int(Wire019.CONNECT)]:
            dialect = Dialect.MEGATRON_019
        elif message[0] != Headers.CONNECT:
            state.clients.setdefault(identity, Dialect.MEGATRON_019)  # never risk a header >= 100
            raise ProtocolError(ErrorCode.MALFORMED, "0.19's CONNECT takes no fields")
        elif len(message) == 1:
            dialect = Dialect.MEGATRON_016
        elif (
            len(message) == 2
            and isinstance(message[1], dict)
            and type(message[1].get("protocol")) is int
        ):
            dialect = Dialect.OURS
            if "coordinator_timeout" in message[1]:
                ack = self._connect_ack(message[1])
        else:
            state.clients.setdefault(identity, Dialect.MEGATRON_016)  # never risk a header >= 100
            raise ProtocolError(ErrorCode.MALFORMED, 'CONNECT takes no fields or {"protocol": n}')
        if identity in state.clients:
            logger.info("client %r connected again", identity)
        else:
            state.monitor.learn(identity, state.stranger_fd)  # to notice when it vanishes
        state.clients[identity] = dialect
        if dialect is Dialect.MEGATRON_019:
            self._send(identity, _CONNECT_ACK_019)
        else:
            self._send(identity, ack)

    @staticmethod
    def _connect_ack(settings: dict[str, Any]) -> bytes:
        """CONNECT_ACK for a client of ours that said how it judges the coordinator."""
        try:
            interval = client_cadence(
                settings["coordinator_timeout"], settings.get("heartbeat_interval")
            )
        except ValueError as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad CONNECT: {exc}") from None
        return encode([int(Headers.CONNECT_ACK), {"heartbeat_interval": interval}])

    def client_gone(self, identity: bytes) -> None:
        """A client's connection closed: abort its requests on their engines, forget them."""
        state = self.state
        state.clients.pop(identity, None)
        state.monitor.forget(identity)
        mine = state.requests.of_client(identity)
        for request_id in mine:
            self._abort(request_id)
        if mine:
            logger.info("client %r is gone: %d request(s) aborted", identity, len(mine))

    # ------------------------------------------------------------------ submits

    def on_submit(self, client: bytes, payload: bytes) -> None:
        """SUBMIT_REQUEST: validate, admit (pick an engine) and queue it for this wake-up."""
        state = self.state
        try:
            _, client_request_id, prompt_raw, sampling_raw = submit_decoder.decode(payload)
        except DECODE_ERRORS as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad SUBMIT_REQUEST: {exc}") from None
        if state.control.stopping:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the engines are stopping")
        if (client, client_request_id) in state.requests.inflight:
            raise ProtocolError(
                ErrorCode.DUPLICATE_REQUEST_ID,
                f"request id {client_request_id!r} is already in flight",
            )
        try:
            prompt = prompt_decoder.decode(prompt_raw)
        except DECODE_ERRORS as exc:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"prompt must be a string or a list of non-negative token ids: {exc}",
            ) from None
        if not prompt:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        sampling, streaming, budget = self._sampling_params(sampling_raw)

        engine = self._admit()  # no_engine / overloaded / shutting_down refuse it here
        request_id = state.requests.add(client, client_request_id, engine, streaming)
        if engine is UNROUTED:
            state.requests.orphans[request_id] = state.now + state.wait_for_engine
        if state.limits.request_timeout is not None:
            state.requests.deadlines.add(state.now + state.limits.request_timeout, request_id)
        if prompt.__class__ is str:
            state.requests.prompt_text[request_id] = prompt
            self.pending.append([engine, request_id, None, sampling, prompt])
        else:
            self.pending.append([engine, request_id, prompt_raw, sampling, None])
        if state.tracks_load:
            to_generate, total = budget
            if total is not None:  # Megatron: num_tokens_total wins (text: an upper bound)
                to_generate = max(0, total - len(prompt)) if prompt.__class__ is list else total
            if engine is ROUTE_LATER:
                self.later.append((self.pending[-1], prompt, to_generate))
            else:
                state.routing_policy.on_submit(engine, request_id, prompt, to_generate)

    def _sampling_params(self, raw: msgspec.Raw) -> tuple[msgspec.Raw, bool, tuple]:
        """Validated sampling params as msgpack, whether they stream and the token budget
        (num_tokens_to_generate, num_tokens_total) for load-aware routing; cached by bytes.

        Clients repeat the same parameters, so validation runs once per distinct value."""
        key = bytes(raw)
        cached = self._sampling_cache.get(key)
        if cached is not None:
            return cached
        try:
            data = any_decoder.decode(key)
        except DECODE_ERRORS as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad sampling params: {exc}") from None
        clean_dict = validate_sampling_params(data)
        clean = (
            msgspec.Raw(encode(clean_dict)),
            clean_dict.get("streaming_interval", 0) > 0,
            (clean_dict.get("num_tokens_to_generate", 30), clean_dict.get("num_tokens_total")),
        )
        if len(self._sampling_cache) >= _SAMPLING_CACHE_SIZE:
            self._sampling_cache.clear()
        self._sampling_cache[key] = clean
        return clean

    def _admit(self) -> bytes:
        """The engine for a new request, or ProtocolError (no engine, overloaded, shutting down).

        With no engine to route to, ``UNROUTED``: the request waits up to ``wait_for_engine``
        seconds for one (replicas still loading when their clients start, the usual order).
        A policy that routes by tokens gets ``ROUTE_LATER``: ``flush`` chooses."""
        state = self.state
        if state.shutdown.active:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
        if len(state.requests) >= state.limits.max_outstanding:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"{state.limits.max_outstanding} requests are in flight (the coordinator's "
                "limit); retry later",
            )
        routable = state.routing_policy.engines  # registered and healthy
        if not routable:
            if state.wait_for_engine > 0:
                return UNROUTED  # held (an orphan) until an engine registers
            why = "is healthy" if state.registry.order else "is registered"
            raise ProtocolError(ErrorCode.NO_ENGINE, f"no engine {why}; retry later")
        if state.routes_by_tokens:
            return ROUTE_LATER
        return self._choose()

    def _choose(self, tokens: list[int] | None = None) -> bytes:
        """The policy's pick, or the engine holding fewest requests if the pick holds the
        per-engine limit; ProtocolError (overloaded) if every engine does."""
        state = self.state
        engine = state.routing_policy.choose(tokens)
        routable = state.routing_policy.engines
        cap = state.limits.max_outstanding_per_engine
        counts = state.requests.per_engine
        if counts.get(engine, 0) >= cap:
            engine = min(routable, key=lambda e: counts.get(e, 0))
            if counts.get(engine, 0) >= cap:
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"every engine holds {cap} requests (the per-engine limit); retry later",
                )
        return engine

    def flush(self) -> None:
        """Send this wake-up's submits in order; text prompts are tokenized in one batch call."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        requests = self.state.requests
        texts = [item for item in pending if item[2] is None]
        if texts:
            self._tokenize(texts)
        if self.later:
            self._route_later()
        submit = int(Headers.SUBMIT_REQUEST)
        submitted = requests.submitted  # kept until the request ends: resent if its engine dies
        engine_of = requests.engine_of
        send_submit = self._send_submit
        for item in pending:
            if item[2] is not None:  # None: tokenization failed, the client has its error
                submitted[item[1]] = item[2] = encode((submit, item[1], item[2], item[3]))
        for engine, request_id, frame, _, _ in pending:
            # An engine found dead during this loop has had its requests moved or failed.
            moved = frame is None or engine_of.get(request_id) != engine or engine is UNROUTED
            if not moved and not send_submit(engine, frame):
                self._engine_unreachable(engine, request_id)

    def _route_later(self) -> None:
        """Choose the engines of this wake-up's ROUTE_LATER requests from their tokens, in
        arrival order (so a deterministic policy sees the request sequence). A request no
        engine can take now (every one died or holds the per-engine limit) is held as an
        orphan or fails, as at admission."""
        state = self.state
        later, self.later = self.later, []
        engine_of = state.requests.engine_of
        for item, prompt, to_generate in later:
            request_id = item[1]
            if engine_of.get(request_id) is not ROUTE_LATER:
                continue  # it failed already (its text could not be tokenized)
            tokens = prompt if item[4] is None else item[2]
            if not state.routing_policy.engines:
                if state.wait_for_engine > 0:
                    item[0] = UNROUTED
                    state.requests.move(request_id, ROUTE_LATER, UNROUTED)
                    state.requests.orphans[request_id] = state.now + state.wait_for_engine
                    continue
                engine = None
                error = ProtocolError(ErrorCode.NO_ENGINE, "no engine is healthy; retry later")
            else:
                try:
                    engine = self._choose(tokens)
                except ProtocolError as exc:
                    engine, error = None, exc
            if engine is None:
                item[2] = None  # not sent, not kept for resubmission
                self._fail(request_id, error.code, str(error))
                continue
            item[0] = engine
            state.requests.move(request_id, ROUTE_LATER, engine)
            state.routing_policy.on_submit(engine, request_id, tokens, to_generate)

    def _tokenize(self, items: list[list[Any]]) -> None:
        """Tokenize the text prompts of ``items`` in place; fail those that cannot be."""
        state = self.state
        for item, tokens in zip(
            items, state.text.tokenize([item[4] for item in items]), strict=True
        ):
            if tokens.__class__ is str:
                self._fail(item[1], ErrorCode.INVALID_REQUEST, tokens)
            else:
                item[2] = tokens
                if state.tracks_load:
                    state.routing_policy.on_prompt_tokens(item[1], len(tokens))

    # ------------------------------------------------------------------ the rest

    def on_control(self, header: Headers, client: bytes, payload: bytes) -> None:
        """Relay PAUSE/UNPAUSE/SUSPEND/RESUME/STOP to every engine, each in its protocol. A
        0.19 client's signal that 0.19's state machine does not allow now is ignored (logged;
        a repeated PAUSE silently), as its own coordinator does."""
        check_header_only(payload)
        self.flush()
        control = self.state.control
        if self.state.clients[client] is Dialect.MEGATRON_019 and not control.allows_019(header):
            if header is not Headers.PAUSE:
                logger.warning(
                    "ignored %s from a 0.19 client: the engines are %s",
                    header.name,
                    control.state_019.value,
                )
            return
        self._rounds.relay(header)

    def on_broadcast_019(self, client: bytes, payload: bytes) -> None:
        """SET_GENERATION_EPOCH ``[44, epoch]`` / START|STOP_CUDA_PROFILER ``[46]|[47]``: to
        every 0.19 engine, unchanged; the epoch also to ours, as SET_GENERATION_EPOCH_OURS
        (weight_updates.py: a version bump, ``str(epoch)`` published)."""
        if peek_header(payload) == Wire019.SET_GENERATION_EPOCH:
            decode_as(epoch_decoder, payload)
        else:
            check_header_only(payload)
        self.flush()
        registry = self.state.registry
        for identity in registry.order:
            if registry.engines[identity].dialect is Dialect.MEGATRON_019:
                self._send(identity, payload)
        if peek_header(payload) == Wire019.SET_GENERATION_EPOCH and self.set_epoch is not None:
            self.set_epoch(decode_as(epoch_decoder, payload)[1])  # ours: a version bump

    def on_shutdown(self, client: bytes, payload: bytes) -> None:
        """SHUTDOWN ``[61]`` (0.19): end the coordinator, leaving the engines running. The
        requests in flight get the shutdown grace to finish, as after SIGTERM."""
        check_header_only(payload)
        logger.warning("a 0.19 client asked the coordinator to shut down")
        self.state.shutdown.request()

    def on_abort(self, client: bytes, payload: bytes) -> None:
        """ABORT ``[105, client_request_id]``: tell the engine holding it."""
        self.flush()
        state = self.state
        _, client_request_id = decode_as(client_id_decoder, payload)
        request_id = state.requests.inflight.get((client, client_request_id))
        if request_id is None:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"no request {client_request_id!r} is in flight"
            )
        engine = state.requests.engine_of[request_id]
        if engine is UNROUTED:  # still waiting for an engine: nothing ran, nothing to return
            self._fail(request_id, ErrorCode.ABORTED, "aborted before any engine took it")
            return
        if not state.registry.speaks_ours(engine):  # Megatron's engines know no ABORT: its
            self._fail(request_id, ErrorCode.ABORTED, "aborted")  # late reply will be dropped
            return
        self._send(engine, encode([int(Headers.ABORT), request_id]))

    def on_heartbeat(self, client: bytes, payload: bytes) -> None:
        """HEARTBEAT ``[102]``: a client of ours checks that the coordinator lives; answered at
        once (it tells a lost coordinator from a quiet one, as engines do)."""
        check_header_only(payload)
        if self.state.clients.get(client) is not Dialect.OURS:
            raise ProtocolError(ErrorCode.UNKNOWN_HEADER, "HEARTBEAT needs our protocol (CONNECT)")
        self._send(client, _HEARTBEAT_REPLY)

    def on_stats(self, client: bytes, payload: bytes) -> None:
        """STATS (health checks, metrics): each replica's liveness and outstanding load."""
        check_header_only(payload)
        self.flush()
        state = self.state
        if state.clients.get(client) is not Dialect.OURS:
            raise ProtocolError(ErrorCode.UNKNOWN_HEADER, "STATS needs our protocol (CONNECT)")
        engines = [
            {
                "data_parallel_rank": engine.data_parallel_rank,
                "alive": True,  # an engine declared dead leaves the list
                "outstanding_requests": state.requests.per_engine.get(engine.identity, 0),
                "outstanding_tokens": self._outstanding_tokens(engine.identity),
                "load": engine.load,
                "identity": engine.identity.hex(),
                "info": engine.info,
                "weight_version": state.versions.current.get(engine.identity),
            }
            for engine in (state.registry.engines[i] for i in state.registry.order)
        ]
        stats = {
            "engines": engines,
            "requests_in_flight": len(state.requests),
            "clients": len(state.clients),
            "engines_lost": state.registry.engines_lost,
            "requests_resubmitted": state.requests_resubmitted,
            "engines_rejoined": state.engines_rejoined,
            "requests_adopted": state.requests_adopted,
            "late_results_dropped": state.late_results_dropped,
            "shutting_down": state.shutdown.deadline is not None,
            "maps": self.map_sizes(),  # every per-request map: all 0 when nothing is in flight
            **state.versions.stats(),  # the published weight version, updates done / failed
        }
        self._send(client, encode([int(Headers.STATS), stats]))

    def map_sizes(self) -> dict[str, int]:
        """Sizes of every per-request and per-peer map (all 0 / engines-only when idle)."""
        sizes = self.state.requests.sizes()
        sizes["pending"] = len(self.pending)
        sizes.update(self.state.monitor.sizes)
        return sizes

    def _outstanding_tokens(self, identity: bytes) -> int | None:
        """The routing policy's view of an engine's outstanding work (None: it keeps none)."""
        policy = self.state.routing_policy
        load = getattr(policy, "load", None)
        if load is None or identity not in policy.engines:
            return None
        return load(identity)
