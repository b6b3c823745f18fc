"""What the coordinator does with each message from an engine: the table from header to handler.

Engines register with one frame (engines.py) and may join at any time; they reply with records,
stream partial results, report errors, heartbeat and acknowledge PAUSE / STOP. An engine that
joins adopts the requests waiting for one. An engine's death is failover.py's; a late reply
from an engine declared dead is dropped, and a HEARTBEAT from it registers it again.

Megatron-core 0.19's engines (``megatron_engines="0.19"``) have a table of their own: replies
``[21, [merged request, ...]]``, reshaped to our records on the way in (dialects.py), and
DISCONNECT ``[60]``, an engine leaving (its requests fail over; during a STOP round it is how
the engine says it stopped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..protocol import ErrorCode, Headers, ProtocolError
from .control_rounds import ControlRounds
from .dialects import (
    ONLY_019_HEADERS,
    Dialect,
    Wire019,
    flat_record,
    record_016,
    wrapped_record,
)
from .endings import RequestEndings
from .engines import BadRegistration, Engine, parse_registration
from .failover import Failover
from .outbox import Outbox
from .state import CoordinatorState
from .wire import (
    check_header_only,
    decode_as,
    describe,
    encode,
    engine_error_decoder,
    heartbeat_decoder,
    partial_decoder,
    reply_decoder,
    tokens_of,
    unexpected,
)

logger = logging.getLogger("megatron_coord.coordinator")

_HEARTBEAT_REPLY = encode([int(Headers.HEARTBEAT), {}])
# A HEARTBEAT's KV block events (prefix caching): for the routing policy's index only.
_BLOCK_EVENTS = ("kv_blocks_stored", "kv_blocks_evicted", "kv_blocks_reset")


class EngineHandlers:
    """Handlers of engine messages, registration and joining.

    ``on_connect`` takes a stranger's CONNECT (a client's handshake) and ``flush_submits``
    sends the submits of the current wake-up (both client_handlers.py)."""

    def __init__(
        self,
        state: CoordinatorState,
        outbox: Outbox,
        endings: RequestEndings,
        rounds: ControlRounds,
        failover: Failover,
        on_connect: Callable[[bytes, bytes], None],
        flush_submits: Callable[[], None],
    ) -> None:
        self.state = state
        self._send = outbox.send
        self._send_error = outbox.send_error
        self._send_control = outbox.send_control
        self._free = endings.free
        self._fail = endings.fail
        self._rounds = rounds
        self._failover = failover
        self._on_connect = on_connect
        self._flush_submits = flush_submits
        self.table = {
            int(Headers.ENGINE_REPLY): self.on_reply,
            int(Headers.PARTIAL_REPLY): self.on_partial_reply,
            int(Headers.PAUSE_ACK): self.on_ack,
            int(Headers.STOP_ACK): self.on_ack,
            int(Headers.ERROR): self.on_error,
            int(Headers.HEARTBEAT): self.on_heartbeat,
        }
        self.table_019 = {
            int(Wire019.ENGINE_REPLY): self.on_reply_019,
            int(Wire019.DISCONNECT): self.on_disconnect,
        }

    def handle(self, engine: Engine, header: int, payload: bytes) -> None:
        state = self.state
        state.registry.heard_from(engine, state.now)
        if engine.dialect is Dialect.MEGATRON_019:
            handler = self.table_019.get(header)
        else:
            handler = self.table.get(header)
        if handler is not None:
            handler(engine, payload)
        elif payload == b"" or header == Headers.REGISTER:
            logger.warning("engine %r registered again; ignored", engine.identity)
        else:
            raise unexpected(header, payload, "engine")

    def handle_stranger(self, identity: bytes, header: int, payload: bytes) -> None:
        """A peer that is neither a registered engine nor a connected client."""
        if header == Headers.CONNECT or header == Wire019.CONNECT:
            self._on_connect(identity, payload)
        elif payload == b"" or header == Headers.REGISTER:
            self.try_register(identity, payload)  # an engine joining (or coming back)
        elif header == Headers.HEARTBEAT and self.state.registry.was_declared_dead(identity):
            # An engine of ours that was declared dead (silent too long) but lives: take it back.
            _, info = decode_as(heartbeat_decoder, payload)
            rank = info.get("data_parallel_rank")
            rank = rank if type(rank) is int and rank >= 0 else None
            logger.warning("engine %r, declared dead, is alive: registering it again", identity)
            if not self._add(identity, rank, Dialect.OURS, info):
                return
            engine = self.state.registry.engines[identity]
            engine.load = info
            self._heartbeat(engine)
        elif header in ONLY_019_HEADERS:  # a 0.19 peer: an ERROR would crash it
            logger.warning(
                "0.19 message (header %d) from %r, which never sent CONNECT; dropped",
                header,
                identity,
            )
        else:
            logger.warning("message from %r, which never sent CONNECT", identity)
            if header == -1:
                raise describe(payload)
            raise ProtocolError(ErrorCode.NOT_CONNECTED, "send CONNECT before anything else")

    # ------------------------------------------------------------------ registration

    def try_register(self, identity: bytes, payload: bytes) -> bool:
        """Register ``identity`` if ``payload`` is a registration; False if it is not one."""
        try:
            registration = parse_registration(identity, payload, self.state.megatron_engines)
        except BadRegistration as exc:
            logger.warning("bad registration from %r: %s", identity, exc)
            self._send_error(identity, None, ErrorCode.MALFORMED, f"bad REGISTER: {exc}")
            return True
        if registration is None:
            return False
        rank, dialect, info = registration
        self._add(identity, rank, dialect, info if dialect is Dialect.OURS else None)
        return True

    def _add(self, identity: bytes, rank: int | None, dialect: Dialect, info: dict | None) -> bool:
        """Register an engine; False if refused (registered already, or no place for it)."""
        state = self.state
        if self._full(identity, dialect is Dialect.OURS):
            return False
        if not state.registry.add(identity, rank, dialect, info):
            return False
        state.monitor.learn(identity, state.stranger_fd)  # to notice when its connection closes
        if state.routing_policy is not None:  # serving already: a join
            self._join(identity)
        return True

    def _full(self, identity: bytes, ours: bool) -> bool:
        """No black holes: with ``data_parallel_size=N > 0`` a new engine only takes the place
        of one that is gone, so a stranger's empty frame never makes an N+1-th engine that
        swallows requests. (N=0, the standalone coordinator: joins stay open; off loopback,
        only --auth-keys keeps strangers out.)"""
        registry = self.state.registry
        size = self.state.data_parallel_size
        if size == 0 or len(registry) < size or identity in registry.engines:
            return False
        logger.warning(
            "refused a registration from %r: all %d engine places are taken", identity, size
        )
        if ours:
            self._send_error(
                identity,
                None,
                ErrorCode.OVERLOADED,
                f"all {size} engine places are taken (data_parallel_size={size})",
            )
        return True

    def _join(self, identity: bytes) -> None:
        """An engine registered while serving: route to it from now on, in the state the
        clients put the others in (paused, suspended, stopping)."""
        state = self.state
        state.registry.order.append(identity)
        state.routing_policy.add_engine(identity)
        if state.registry.engines[identity].dialect is Dialect.MEGATRON_019:
            catch_up = state.control.catch_up_019()
        else:
            catch_up = state.control.catch_up()
        for header in catch_up:
            self._send_control(identity, header)
        logger.info("engine %r joined; %d engine(s) now", identity, len(state.registry.order))
        if state.requests.orphans:
            self._adopt_orphans()

    # ------------------------------------------------------------------ messages

    def on_reply(self, engine: Engine, payload: bytes) -> None:
        """ENGINE_REPLY ``[4, [record, ...]]``: route each finished record to its client."""
        _, records = decode_as(reply_decoder, payload)
        self._route_records(engine, records, from_019=False)

    def on_reply_019(self, engine: Engine, payload: bytes) -> None:
        """0.19's ENGINE_REPLY ``[21, [merged request, ...]]``: each one as a record of ours
        (``{"requests": [merged]}``, the same dict), then routed like any reply."""
        _, merged = decode_as(reply_decoder, payload)
        records = [{"requests": [request], "latency": request.get("latency")} for request in merged]
        self._route_records(engine, records, from_019=True)

    def on_disconnect(self, engine: Engine, payload: bytes) -> None:
        """DISCONNECT ``[60]`` (0.19): the engine leaves; after STOP, it has stopped."""
        check_header_only(payload)
        self._failover.engine_gone(engine.identity, "the engine disconnected (DISCONNECT)")

    def _route_records(self, engine: Engine, records: list[dict], from_019: bool) -> None:
        """Send each finished record to its client, in the client's protocol."""
        state = self.state
        engine_of = state.requests.engine_of
        routed = []
        for record in records:
            try:
                request_id = record["requests"][0]["request_id"]
            except (KeyError, IndexError, TypeError):
                logger.warning(
                    "engine %r: a record without requests[0].request_id", engine.identity
                )
                continue
            if engine_of.get(request_id) != engine.identity:
                logger.warning(
                    "engine %r replied for request %r, which it does not hold; dropped",
                    engine.identity,
                    request_id,
                )
                continue
            routed.append((request_id, record))
        if not routed:
            return
        failed = state.text.detokenize_records(
            [r for _, r in routed], state.requests.prompt_text, strict=False
        )
        reply = int(Headers.ENGINE_REPLY)
        reply_019 = int(Wire019.ENGINE_REPLY)
        clients = state.clients
        tracks_load = state.tracks_load
        free = self._free
        send = self._send
        token_texts = state.text.token_texts
        for index, (request_id, record) in enumerate(routed):
            if index in failed:
                self._fail(request_id, ErrorCode.ENGINE_FAILED, failed[index])
                continue
            generated = None
            if tracks_load:
                generated = len(tokens_of(record["requests"][0]["generated_tokens"]))
            client, client_request_id = free(request_id, generated)
            dialect = clients.get(client)
            if dialect is Dialect.MEGATRON_019:  # a 0.19 engine's request is 0.19's already
                flat = record["requests"][0] if from_019 else flat_record(record, token_texts)
                send(client, encode([reply_019, client_request_id, flat]))
            elif dialect is Dialect.MEGATRON_016:
                if from_019:
                    record = wrapped_record(record["requests"][0])
                else:
                    record = record_016(record, token_texts)
                send(client, encode([reply, client_request_id, record]))
            else:
                send(client, encode([reply, client_request_id, record]))

    def on_partial_reply(self, engine: Engine, payload: bytes) -> None:
        """PARTIAL_REPLY ``[103, [[request_id, new_tokens(, extras)], ...]]``: relay the new
        text (and the extras: the new tokens' log-probs / top-N, when asked for)."""
        state = self.state
        _, items = decode_as(partial_decoder, payload)
        header = int(Headers.PARTIAL_REPLY)
        table = state.requests
        for item in items:
            request_id, tokens, extras = item.request_id, item.tokens, item.extras
            stream = table.streams.get(request_id)
            if stream is None or table.engine_of.get(request_id) != engine.identity:
                logger.warning("partial reply for request %r not streaming here", request_id)
                continue
            client = table.client_of[request_id]
            if state.tracks_load:
                state.routing_policy.on_tokens(engine.identity, request_id, len(tokens))
            detokenize = state.text.detokenize
            if extras is not None and extras.get("skip_special_tokens") is False:
                detokenize = state.text.detokenize_keeping_special
            try:
                text = stream.push(detokenize, tokens)
            except Exception as exc:
                self._fail(request_id, ErrorCode.ENGINE_FAILED, f"cannot detokenize: {exc}")
                continue
            if state.clients.get(client) is Dialect.OURS:  # only ours understand PARTIAL_REPLY
                client_request_id = table.client_request_id_of[request_id]
                message = [header, client_request_id, tokens, text]
                if extras:
                    message.append(extras)
                self._send(client, encode(message))

    def on_error(self, engine: Engine, payload: bytes) -> None:
        """ERROR ``[100, request_id, code, message]``: the engine failed one request."""
        _, request_id, code, text = decode_as(engine_error_decoder, payload)
        if self.state.requests.engine_of.get(request_id) != engine.identity:
            logger.warning(
                "engine %r: ERROR for request %r it does not hold", engine.identity, request_id
            )
            return
        try:
            error_code = ErrorCode(code)
        except ValueError:
            error_code = ErrorCode.ENGINE_FAILED
        self._fail(request_id, error_code, text)

    def on_heartbeat(self, engine: Engine, payload: bytes) -> None:
        """HEARTBEAT ``[102, load]``: the engine lives, and reports its load."""
        _, engine.load = decode_as(heartbeat_decoder, payload)
        self._heartbeat(engine)
        self._route_by_health(engine)
        state = self.state
        if state.tracks_load:
            state.routing_policy.on_load_report(engine.identity, engine.load)
        for key in _BLOCK_EVENTS:  # consumed: STATS (every /metrics scrape) need not carry them
            engine.load.pop(key, None)

    def _route_by_health(self, engine: Engine) -> None:
        """``"healthy": false`` (its model steps keep failing): no new request goes to the
        engine; a healthy report puts it back. It stays registered and in ``order``, so it
        keeps what it holds and PAUSE / STOP still reach it."""
        state = self.state
        policy = state.routing_policy
        identity = engine.identity
        if policy is None or identity not in state.registry.order:
            return
        healthy = engine.load.get("healthy") is not False
        if healthy == (identity in policy.engines):
            return
        if healthy:
            policy.add_engine(identity)
            logger.warning("engine %r is healthy again: routing to it", identity)
            if state.requests.orphans:
                self._adopt_orphans()
        else:
            policy.remove_engine(identity)
            logger.error("engine %r reports itself unhealthy: routing around it", identity)

    def _heartbeat(self, engine: Engine) -> None:
        state = self.state
        if state.registry.heartbeat(engine, state.now):
            self._send(engine.identity, _HEARTBEAT_REPLY)

    def on_ack(self, engine: Engine, payload: bytes) -> None:
        """PAUSE_ACK / STOP_ACK; once every engine acked, everyone is told."""
        check_header_only(payload)
        header = Headers(payload[1])
        rounds = self._rounds
        if self.state.control.ack(engine.identity, header, rounds.awaited_from(header)):
            rounds.all_acked(header)

    def _adopt_orphans(self) -> None:
        """An engine joined: the requests waiting for one go to it (or the policy's pick)."""
        self._flush_submits()  # requests held in this wake-up get their SUBMIT frame
        requests = self.state.requests
        orphans, requests.orphans = requests.orphans, {}
        logger.warning("sending %d request(s) that waited for an engine", len(orphans))
        for request_id in orphans:
            self._failover.resubmit(
                request_id, requests.engine_of[request_id], requests.submitted[request_id]
            )
