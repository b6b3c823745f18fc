"""What the coordinator does with each message from an engine: the table from header to handler.

Engines register with one frame (engines.py) and may join at any time; they reply with records,
stream partial results, report errors, heartbeat and acknowledge PAUSE / STOP. An engine of
ours that keeps the liveness contract is answered REGISTER_ACK first (adoption.py: its
heartbeat cadence, and what it still holds of ours when it registers again). An engine that
joins adopts the requests waiting for one. An engine's death is failover.py's.

Every request gets exactly one final answer: the first final result wins, wherever it came
from (first_result.py), and later results are dropped (one log line per message, with
counts). An engine of ours declared dead that speaks again is asked to register again (an
older one of ours comes back with its HEARTBEAT).

Megatron-core 0.19's engines (``megatron_engines="0.19"``) have a table of their own: replies
``[21, [merged request, ...]]``, reshaped to our records on the way in (dialects.py), and
DISCONNECT ``[60]``, an engine leaving (its requests fail over; during a STOP round it is how
the engine says it stopped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..liveness_contract import LivenessMismatch, engine_cadence
from ..protocol import ErrorCode, Headers, ProtocolError
from .adoption import Adoption
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
from .first_result import abort_losers, wins_from_elsewhere
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
        self._send_quietly = outbox.send_quietly
        self._adoption = Adoption(state, outbox.send, failover.engine_gone)
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
        elif (dead := self.state.registry.dead(identity)) is not None:
            self._from_the_dead(dead, header, payload)
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

    def _from_the_dead(self, engine: Engine, header: int, payload: bytes) -> None:
        """A message from an engine of ours declared dead: it lives (it was only silent). Its
        results may still be the first; it is asked to register again with what it holds,
        and an older engine of ours (no liveness contract) comes back with its HEARTBEAT."""
        identity = engine.identity
        registry = self.state.registry
        if header == Headers.HEARTBEAT and not engine.rejoins:
            _, load = decode_as(heartbeat_decoder, payload)
            logger.warning("engine %r, declared dead, is alive: registering it again", identity)
            registry.forget_dead(identity)
            if self._add(identity, engine.data_parallel_rank, Dialect.OURS, engine.info):
                back = registry.engines[identity]
                back.load = load
                self._heartbeat(back)
            return
        if header == Headers.ENGINE_REPLY:
            self.on_reply(engine, payload)
        elif header == Headers.ERROR:
            self.on_error(engine, payload)
        if registry.first_ask_back(identity):
            logger.warning(
                "engine %r (dp rank %s), declared dead, is alive: asking it to register again",
                identity,
                engine.data_parallel_rank,
            )
        self._send_error(
            identity,
            None,
            ErrorCode.NOT_CONNECTED,
            "this engine was declared dead (silent too long); register again",
        )

    # ------------------------------------------------------------------ registration

    def try_register(self, identity: bytes, payload: bytes) -> bool:
        """Register ``identity`` if ``payload`` is a registration; False if it is not one.
        An engine of ours that says its heartbeat interval is held to the liveness contract:
        answered REGISTER_ACK, or refused if its interval is forced too slow."""
        state = self.state
        try:
            registration = parse_registration(identity, payload, state.megatron_engines)
            if registration is None:
                return False
            rank, dialect, info = registration
            cadence = None
            if dialect is Dialect.OURS and "heartbeat_interval" in info:
                cadence = engine_cadence(
                    state.engine_timeout,
                    info["heartbeat_interval"],
                    info.get("heartbeat_interval_fixed") is True,
                )
        except LivenessMismatch as exc:
            self._adoption.refuse(identity, str(exc))
            return True
        except (BadRegistration, ValueError) as exc:
            logger.warning("bad registration from %r: %s", identity, exc)
            self._send_error(identity, None, ErrorCode.MALFORMED, f"bad REGISTER: {exc}")
            return True
        self._add(identity, rank, dialect, info if dialect is Dialect.OURS else None, cadence)
        return True

    def _add(
        self,
        identity: bytes,
        rank: int | None,
        dialect: Dialect,
        info: dict | None,
        cadence: float | None = None,
    ) -> bool:
        """Register an engine; False if refused (registered already, or no place for it).
        Serving already, it joins: routed to, told its REGISTER_ACK (before anything else),
        brought into the state the clients put the others in."""
        state = self.state
        if self._full(identity, dialect is Dialect.OURS):
            return False
        if not state.registry.add(identity, rank, dialect, info):
            return False
        state.versions.register(identity, info if dialect is Dialect.OURS else None)
        state.registry.forget_dead(identity)
        state.monitor.learn(identity, state.stranger_fd)  # to notice when its connection closes
        serving = state.routing_policy is not None
        if serving:
            state.registry.order.append(identity)
            if state.versions.serves(identity):  # of the published version (versions.py)
                state.routing_policy.add_engine(identity)
        if state.registry.engines[identity].rejoins:
            self._adoption.acknowledge(identity, info, cadence)
        if serving:
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
        """An engine registered while serving (and is routed to): bring it into the state the
        clients put the others in (paused, suspended, stopping); give it the orphans."""
        state = self.state
        engine = state.registry.engines.get(identity)
        if engine is None:
            return  # its previous identity's requests failed over to it, and it was unreachable
        if engine.dialect is Dialect.MEGATRON_019:
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
        """Send each finished record to its client, in the client's protocol (the first final
        result of a request wins: see the module docstring)."""
        state = self.state
        engine_of = state.requests.engine_of
        identity = engine.identity
        routed = []
        late: dict[int, bytes] = {}  # won from elsewhere -> the engine still holding it
        dropped = 0
        for record in records:
            try:
                request_id = record["requests"][0]["request_id"]
            except (KeyError, IndexError, TypeError):
                logger.warning("engine %r: a record without requests[0].request_id", identity)
                continue
            holder = engine_of.get(request_id)
            if holder != identity:
                if not wins_from_elsewhere(state.requests, request_id, record):
                    dropped += 1
                    continue
                late[request_id] = holder
            routed.append((request_id, record))
        if dropped:
            state.late_results_dropped += dropped
            logger.info(
                "engine %r: dropped %d result(s) of requests it no longer holds (answered, "
                "ended or moved elsewhere)",
                identity,
                dropped,
            )
        if late:
            abort_losers(state.registry, self._send_quietly, late)
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
        text and the extras (the new tokens' log-probs / top-N when asked for, their version
        spans), only from the engine holding the request: no stream repeats a token."""
        state = self.state
        _, items = decode_as(partial_decoder, payload)
        header = int(Headers.PARTIAL_REPLY)
        table = state.requests
        dropped = 0
        for item in items:
            request_id, tokens, extras = item.request_id, item.tokens, item.extras
            stream = table.streams.get(request_id)
            if stream is None or table.engine_of.get(request_id) != engine.identity:
                dropped += 1
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
        if dropped:
            logger.info(
                "engine %r: dropped %d partial result(s) of requests not streaming from it",
                engine.identity,
                dropped,
            )

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
        state = self.state
        if state.versions.reported(engine.identity, engine.load.get("weight_version")):
            state.routing_policy.on_version_change(engine.identity)  # before its block events
        self._route_by_health(engine)
        if state.tracks_load:
            state.routing_policy.on_load_report(engine.identity, engine.load)
        for key in _BLOCK_EVENTS:  # consumed: STATS (every /metrics scrape) need not carry them
            engine.load.pop(key, None)

    def reroute(self, identity: bytes) -> None:
        """Decide again whether ``identity`` is routed to (a weight update ended)."""
        engine = self.state.registry.engines.get(identity)
        if engine is not None:
            self._route_by_health(engine)

    def _route_by_health(self, engine: Engine) -> None:
        """``"healthy": false`` (its model steps keep failing, or an update left its weights
        mixed) or weights other than the published ones (versions.py): no new request goes
        to the engine; a healthy report puts it back. It stays registered and in ``order``,
        so it keeps what it holds and PAUSE / STOP still reach it."""
        state = self.state
        policy = state.routing_policy
        identity = engine.identity
        if policy is None or identity not in state.registry.order:
            return
        load = engine.load or {}
        healthy = load.get("healthy") is not False and state.versions.serves(identity)
        if healthy == (identity in policy.engines):
            return
        if healthy:
            policy.add_engine(identity)
            logger.warning("engine %r is healthy again: routing to it", identity)
            if state.requests.orphans:
                self._adopt_orphans()
        else:
            policy.remove_engine(identity)
            logger.error(
                "engine %r is unhealthy or serves other weights: routing around it", identity
            )

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
        """An engine joined: the requests waiting for one go to it (or the policy's pick),
        but those that wait for their own engine (failover.py)."""
        self._flush_submits()  # requests held in this wake-up get their SUBMIT frame
        self._failover.send_orphans()
