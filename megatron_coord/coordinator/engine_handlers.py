"""What the coordinator does with each message from an engine, and when an engine dies.

Engines register with one frame (engines.py) and may join at any time; they reply with records,
stream partial results, report errors, heartbeat and acknowledge PAUSE / STOP. An engine is
dead when its connection closes (socket monitor, any protocol), when a send to it fails, or,
once it heartbeats, after ``engine_timeout`` seconds without a single message. A dead engine
gets no new request, and each request it held gets exactly one outcome: sent again, unchanged,
to a live engine if nothing of it reached the client, else an ``engine_failed`` ERROR saying how
much the client already received. With no engine left (every replica looked lost at once), a
request that could be resubmitted waits ``failover_wait`` seconds for one to register (or come
back) before it fails with ``no_engine``. A late reply from an engine
declared dead is dropped, and the engine is told to ABORT what it held; a HEARTBEAT from it
registers it again.

Megatron-core 0.19's engines (``megatron_engines="0.19"``) have a table of their own: replies
``[21, [merged request, ...]]``, reshaped to our records on the way in (dialects.py), and
DISCONNECT ``[60]``, an engine leaving (its requests fail over; during a STOP round it is how
the engine says it stopped).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..protocol import ErrorCode, Headers, ProtocolError
from .control import State019
from .dialects import (
    ONLY_019_HEADERS,
    Dialect,
    Wire019,
    flat_record,
    record_016,
    wrapped_record,
)
from .engines import BadRegistration, Engine, parse_registration
from .requests import UNROUTED
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

if TYPE_CHECKING:
    from .coordinator import DataParallelInferenceCoordinator

logger = logging.getLogger("megatron_coord.coordinator")

_HEARTBEAT_REPLY = encode([int(Headers.HEARTBEAT), {}])
# A HEARTBEAT's KV block events (prefix caching): for the routing policy's index only.
_BLOCK_EVENTS = ("kv_blocks_stored", "kv_blocks_evicted", "kv_blocks_reset")


class EngineHandlers:
    """Handlers of engine messages, registration and joining, death and fail-over."""

    def __init__(self, coordinator: DataParallelInferenceCoordinator) -> None:
        self.c = coordinator
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
        self.c.registry.heard_from(engine, self.c.now)
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
        c = self.c
        if header == Headers.CONNECT or header == Wire019.CONNECT:
            c.client_handlers.on_connect(identity, payload)
        elif payload == b"" or header == Headers.REGISTER:
            self.try_register(identity, payload)  # an engine joining (or coming back)
        elif header == Headers.HEARTBEAT and c.registry.was_declared_dead(identity):
            # An engine of ours that was declared dead (silent too long) but lives: take it back.
            _, info = decode_as(heartbeat_decoder, payload)
            rank = info.get("data_parallel_rank")
            rank = rank if type(rank) is int and rank >= 0 else None
            logger.warning("engine %r, declared dead, is alive: registering it again", identity)
            if not self._add(identity, rank, Dialect.OURS, info):
                return
            engine = c.registry.engines[identity]
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
            registration = parse_registration(identity, payload, self.c.megatron_engines)
        except BadRegistration as exc:
            logger.warning("bad registration from %r: %s", identity, exc)
            self.c.send_error(identity, None, ErrorCode.MALFORMED, f"bad REGISTER: {exc}")
            return True
        if registration is None:
            return False
        rank, dialect, info = registration
        self._add(identity, rank, dialect, info if dialect is Dialect.OURS else None)
        return True

    def _add(self, identity: bytes, rank: int | None, dialect: Dialect, info: dict | None) -> bool:
        """Register an engine; False if refused (registered already, or no place for it)."""
        c = self.c
        if self._full(identity, dialect is Dialect.OURS):
            return False
        if not c.registry.add(identity, rank, dialect, info):
            return False
        c.monitor.learn(identity, c.stranger_fd)  # to notice when its connection closes
        if getattr(c, "routing_policy", None) is not None:  # serving already: a join
            self._join(identity)
        return True

    def _full(self, identity: bytes, ours: bool) -> bool:
        """No black holes: with ``data_parallel_size=N > 0`` a new engine only takes the place
        of one that is gone, so a stranger's empty frame never makes an N+1-th engine that
        swallows requests. (N=0, the standalone coordinator: joins stay open; off loopback,
        only --auth-keys keeps strangers out.)"""
        c = self.c
        size = c.data_parallel_size
        if size == 0 or len(c.registry) < size or identity in c.registry.engines:
            return False
        logger.warning(
            "refused a registration from %r: all %d engine places are taken", identity, size
        )
        if ours:
            c.send_error(
                identity,
                None,
                ErrorCode.OVERLOADED,
                f"all {size} engine places are taken (data_parallel_size={size})",
            )
        return True

    def _join(self, identity: bytes) -> None:
        """An engine registered while serving: route to it from now on, in the state the
        clients put the others in (paused, suspended, stopping)."""
        c = self.c
        c.registry.order.append(identity)
        c.routing_policy.add_engine(identity)
        if c.registry.engines[identity].dialect is Dialect.MEGATRON_019:
            catch_up = c.control.catch_up_019()
        else:
            catch_up = c.control.catch_up()
        for header in catch_up:
            c.send_control(identity, header)
        logger.info("engine %r joined; %d engine(s) now", identity, len(c.registry.order))
        if c.requests.orphans:
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
        self.engine_gone(engine.identity, "the engine disconnected (DISCONNECT)")

    def _route_records(self, engine: Engine, records: list[dict], from_019: bool) -> None:
        """Send each finished record to its client, in the client's protocol."""
        c = self.c
        engine_of = c.requests.engine_of
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
        failed = c.text.detokenize_records(
            [r for _, r in routed], c.requests.prompt_text, strict=False
        )
        reply = int(Headers.ENGINE_REPLY)
        reply_019 = int(Wire019.ENGINE_REPLY)
        clients = c.clients
        token_texts = c.text.token_texts
        for index, (request_id, record) in enumerate(routed):
            if index in failed:
                c.fail(request_id, ErrorCode.ENGINE_FAILED, failed[index])
                continue
            generated = None
            if c.tracks_load:
                generated = len(tokens_of(record["requests"][0]["generated_tokens"]))
            client, client_request_id = c.free(request_id, generated)
            dialect = clients.get(client)
            if dialect is Dialect.MEGATRON_019:  # a 0.19 engine's request is 0.19's already
                flat = record["requests"][0] if from_019 else flat_record(record, token_texts)
                c.send(client, encode([reply_019, client_request_id, flat]))
            elif dialect is Dialect.MEGATRON_016:
                if from_019:
                    record = wrapped_record(record["requests"][0])
                else:
                    record = record_016(record, token_texts)
                c.send(client, encode([reply, client_request_id, record]))
            else:
                c.send(client, encode([reply, client_request_id, record]))

    def on_partial_reply(self, engine: Engine, payload: bytes) -> None:
        """PARTIAL_REPLY ``[103, [[request_id, new_tokens(, extras)], ...]]``: relay the new
        text (and the extras: the new tokens' log-probs / top-N, when asked for)."""
        c = self.c
        _, items = decode_as(partial_decoder, payload)
        header = int(Headers.PARTIAL_REPLY)
        table = c.requests
        for item in items:
            request_id, tokens, extras = item.request_id, item.tokens, item.extras
            stream = table.streams.get(request_id)
            if stream is None or table.engine_of.get(request_id) != engine.identity:
                logger.warning("partial reply for request %r not streaming here", request_id)
                continue
            client = table.client_of[request_id]
            if c.tracks_load:
                c.routing_policy.on_tokens(engine.identity, request_id, len(tokens))
            detokenize = c.text.detokenize
            if extras is not None and extras.get("skip_special_tokens") is False:
                detokenize = c.text.detokenize_keeping_special
            try:
                text = stream.push(detokenize, tokens)
            except Exception as exc:
                c.fail(request_id, ErrorCode.ENGINE_FAILED, f"cannot detokenize: {exc}")
                continue
            if c.clients.get(client) is Dialect.OURS:  # only ours understand PARTIAL_REPLY
                client_request_id = table.client_request_id_of[request_id]
                message = [header, client_request_id, tokens, text]
                if extras:
                    message.append(extras)
                c.send(client, encode(message))

    def on_error(self, engine: Engine, payload: bytes) -> None:
        """ERROR ``[100, request_id, code, message]``: the engine failed one request."""
        c = self.c
        _, request_id, code, text = decode_as(engine_error_decoder, payload)
        if c.requests.engine_of.get(request_id) != engine.identity:
            logger.warning(
                "engine %r: ERROR for request %r it does not hold", engine.identity, request_id
            )
            return
        try:
            error_code = ErrorCode(code)
        except ValueError:
            error_code = ErrorCode.ENGINE_FAILED
        c.fail(request_id, error_code, text)

    def on_heartbeat(self, engine: Engine, payload: bytes) -> None:
        """HEARTBEAT ``[102, load]``: the engine lives, and reports its load."""
        _, engine.load = decode_as(heartbeat_decoder, payload)
        self._heartbeat(engine)
        self._route_by_health(engine)
        if self.c.tracks_load:
            self.c.routing_policy.on_load_report(engine.identity, engine.load)
        for key in _BLOCK_EVENTS:  # consumed: STATS (every /metrics scrape) need not carry them
            engine.load.pop(key, None)

    def _route_by_health(self, engine: Engine) -> None:
        """``"healthy": false`` (its model steps keep failing): no new request goes to the
        engine; a healthy report puts it back. It stays registered and in ``order``, so it
        keeps what it holds and PAUSE / STOP still reach it."""
        c = self.c
        policy = getattr(c, "routing_policy", None)
        identity = engine.identity
        if policy is None or identity not in c.registry.order:
            return
        healthy = engine.load.get("healthy") is not False
        if healthy == (identity in policy.engines):
            return
        if healthy:
            policy.add_engine(identity)
            logger.warning("engine %r is healthy again: routing to it", identity)
            if c.requests.orphans:
                self._adopt_orphans()
        else:
            policy.remove_engine(identity)
            logger.error("engine %r reports itself unhealthy: routing around it", identity)

    def _heartbeat(self, engine: Engine) -> None:
        if self.c.registry.heartbeat(engine, self.c.now):
            self.c.send(engine.identity, _HEARTBEAT_REPLY)

    def on_ack(self, engine: Engine, payload: bytes) -> None:
        """PAUSE_ACK / STOP_ACK; once every engine acked, everyone is told."""
        check_header_only(payload)
        c = self.c
        header = Headers(payload[1])
        if c.control.ack(engine.identity, header, c.awaited_from(header)):
            c.all_acked(header)

    # ------------------------------------------------------------------ death and fail-over

    def engine_unreachable(self, engine: bytes, request_id: int) -> None:
        """A send to ``engine`` failed: its connection is gone."""
        c = self.c
        if engine in c.registry.engines:
            self.engine_gone(engine, "the engine is unreachable")
        elif c.requests.engine_of.get(request_id) == engine:
            self._fail_over(request_id, engine, "the engine is unreachable")

    def engine_gone(self, identity: bytes, reason: str) -> None:
        """Declare an engine dead: no more routing; one outcome for each request it held."""
        c = self.c
        engine = c.registry.remove(identity)
        if engine is None:
            return
        c.monitor.forget(identity)
        if identity in c.routing_policy.engines:
            c.routing_policy.remove_engine(identity)
        held = c.requests.held_by(identity)
        stopped = engine.state_019 is State019.STOPPING  # a 0.19 engine leaving after STOP
        logger.log(
            logging.INFO if stopped else logging.ERROR,
            "engine %r (dp rank %s) is gone: %s; %d request(s) in flight on it; %d engine(s) left",
            identity,
            engine.data_parallel_rank,
            reason,
            len(held),
            len(c.registry.order),
        )
        abort = int(Headers.ABORT)
        for request_id in held:
            if engine.ours:  # if it still lives (Megatron's engines know no ABORT)
                c.send_quietly(identity, encode([abort, request_id]))
            self._fail_over(request_id, identity, reason)
        c.requests.forget_engine(identity)
        for header in c.control.engine_left(identity, c.awaited_from):
            c.all_acked(header)

    def _fail_over(self, request_id: int, dead: bytes, reason: str) -> None:
        """Send a dead engine's request to a live one, or fail it (exactly one outcome)."""
        c = self.c
        stream = c.requests.streams.get(request_id)
        if stream is not None and stream.tokens:
            c.fail(
                request_id,
                ErrorCode.ENGINE_FAILED,
                f"the engine serving this request died ({reason}) after {len(stream.tokens)} "
                "token(s) were streamed to you; a partial generation cannot be resumed",
            )
            return
        payload = c.requests.submitted.get(request_id)
        if c.shutdown.deadline is not None or payload is None:
            c.fail(request_id, ErrorCode.SHUTTING_DOWN, f"the engine stopped ({reason})")
            return
        if not c.routing_policy.engines:  # none registered, or none healthy
            if c.failover_wait > 0:  # every replica looked lost at once: wait for one
                c.requests.orphans[request_id] = c.now + c.failover_wait
                return
            c.fail(request_id, ErrorCode.NO_ENGINE, _no_engine_left(reason))
            return
        self._resubmit(request_id, dead, payload)

    def _resubmit(self, request_id: int, dead: bytes, payload: bytes) -> None:
        """Send a request of the dead engine ``dead`` (UNROUTED: of none yet), unchanged, to
        the routing policy's pick."""
        c = self.c
        engine = c.routing_policy.choose()
        c.requests.move(request_id, dead, engine)
        if c.tracks_load:
            c.routing_policy.on_resubmit(dead, engine, request_id)
        if dead is not UNROUTED:
            c.requests_resubmitted += 1
        if not c.send_submit(engine, payload):
            c.fail(request_id, ErrorCode.ENGINE_FAILED, "no engine could take the request")

    def _adopt_orphans(self) -> None:
        """An engine joined: the requests waiting for one go to it (or the policy's pick)."""
        c = self.c
        c.client_handlers.flush()  # requests held in this wake-up get their SUBMIT frame
        orphans, c.requests.orphans = c.requests.orphans, {}
        logger.warning("sending %d request(s) that waited for an engine", len(orphans))
        for request_id in orphans:
            self._resubmit(
                request_id, c.requests.engine_of[request_id], c.requests.submitted[request_id]
            )

    def expire_orphans(self, now: float) -> None:
        """Fail the requests that waited ``failover_wait`` for an engine in vain."""
        c = self.c
        expired = [rid for rid, deadline in c.requests.orphans.items() if deadline <= now]
        for request_id in expired:
            if c.requests.engine_of.get(request_id) is UNROUTED:
                why = f"no engine registered within {c.wait_for_engine:g} s; retry later"
            else:
                why = _no_engine_left(f"no engine came back within {c.failover_wait:g} s")
            c.fail(request_id, ErrorCode.NO_ENGINE, why)


def _no_engine_left(reason: str) -> str:
    return f"the engine serving this request died ({reason}) and no other engine is registered"
