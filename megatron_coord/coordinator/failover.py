"""An engine's death, and the one outcome of each request it held.

An engine is dead when its connection closes (socket monitor, any protocol), when a send to it
fails, when it says DISCONNECT (0.19), or, once it heartbeats, after ``engine_timeout`` seconds
without a single message. A dead engine gets no new request, and each request it held gets
exactly one outcome: sent again, unchanged, to a live engine if nothing of it reached the
client, else an ``engine_failed`` ERROR saying how much the client already received (an engine
of ours is told to ABORT what no longer waits for it, in case it still lives). With no engine
left
(every replica looked lost at once), a request that could be resubmitted waits
``failover_wait`` seconds for one to register (or come back) before it fails with
``no_engine``; a new request admitted while no engine could take it waits ``wait_for_engine``
seconds alike. These waiting requests are the orphans; an engine joining adopts them
(engine_handlers.py).

Silence may end: a replica that only paused (GC, swapping, SIGSTOP) comes back and registers
again with what it holds (adoption.py), so a death by silence (``may_return``) loses nothing
that can wait: a stream of which tokens already reached its client, which no other engine can
continue, waits ``failover_wait`` for its own replica instead of failing at once, and an orphan
of such an engine waits ``RESERVED_TIMEOUTS`` engine timeouts for that engine alone before any
engine that joins may take it, so the first replica back gets back what it holds and new work,
not every other one's backlog too. Each request fails over at most ``MAX_FAILOVERS`` times, so
a replica that keeps coming and going never bounces a request forever. Each death is logged
once, with counts.
"""

from __future__ import annotations

import logging
from collections import Counter

from ..protocol import ErrorCode, Headers
from .control import State019
from .control_rounds import ControlRounds
from .endings import RequestEndings
from .outbox import Outbox
from .requests import UNROUTED
from .state import CoordinatorState
from .wire import encode

logger = logging.getLogger("megatron_coord.coordinator")

MAX_FAILOVERS = 3  # engines a request may lose before it fails
RESERVED_TIMEOUTS = 2  # engine timeouts an orphan of a silent engine waits for it alone
RESUBMITTED = "resubmitted"
WAITING = "waiting for an engine"
FAILED = "failed"


class Failover:
    """Declaring engines dead, resubmitting or failing what they held, expiring orphans."""

    def __init__(
        self,
        state: CoordinatorState,
        outbox: Outbox,
        endings: RequestEndings,
        rounds: ControlRounds,
    ) -> None:
        self.state = state
        self.outbox = outbox
        self._fail = endings.fail
        self._rounds = rounds

    def engine_unreachable(self, engine: bytes, request_id: int) -> None:
        """A send to ``engine`` failed: its connection is gone."""
        state = self.state
        if engine in state.registry.engines:
            self.engine_gone(engine, "the engine is unreachable")
        elif state.requests.engine_of.get(request_id) == engine:
            self._fail_over(request_id, engine, "the engine is unreachable", False)

    def engine_gone(self, identity: bytes, reason: str, may_return: bool = False) -> None:
        """Declare an engine dead: no more routing; one outcome for each request it held.
        ``may_return``: it fell silent (it may still live, and come back)."""
        state = self.state
        engine = state.registry.remove(identity)
        if engine is None:
            return
        state.monitor.forget(identity)
        if identity in state.routing_policy.engines:
            state.routing_policy.remove_engine(identity)
        held = state.requests.held_by(identity)
        outcomes: Counter[str] = Counter()
        for request_id in held:
            outcome = self._fail_over(request_id, identity, reason, may_return)
            outcomes[outcome] += 1
            if outcome == FAILED:
                self._abort_on_dead(identity, request_id)
        state.requests.forget_engine(identity)
        if state.versions_watcher is not None:
            state.versions_watcher(identity)  # failed in the update round it was in
        stopped = engine.state_019 is State019.STOPPING  # a 0.19 engine leaving after STOP
        logger.log(
            logging.INFO if stopped else logging.ERROR,
            "engine %r (dp rank %s) is gone: %s; %d request(s) in flight on it%s; %d engine(s) "
            "left",
            identity,
            engine.data_parallel_rank,
            reason,
            len(held),
            "".join(f", {n} {outcome}" for outcome, n in sorted(outcomes.items())),
            len(state.registry.order),
        )
        for header in state.control.engine_left(identity, self._rounds.awaited_from):
            self._rounds.all_acked(header)

    def _fail_over(self, request_id: int, dead: bytes, reason: str, may_return: bool) -> str:
        """Send a dead engine's request to a live one, keep it waiting, or fail it (exactly
        one outcome, returned)."""
        state = self.state
        requests = state.requests
        failovers = requests.failovers.get(request_id, 0) + 1
        requests.failovers[request_id] = failovers
        shutting_down = state.shutdown.deadline is not None
        stream = requests.streams.get(request_id)
        if stream is not None and stream.tokens:
            if may_return and state.failover_wait > 0 and not shutting_down:
                requests.orphans[request_id] = state.now + state.failover_wait  # for its engine
                return WAITING
            self._fail(
                request_id,
                ErrorCode.ENGINE_FAILED,
                f"the engine serving this request died ({reason}) after {len(stream.tokens)} "
                "token(s) were streamed to you; a partial generation cannot be resumed",
                log=False,
            )
            return FAILED
        payload = requests.submitted.get(request_id)
        if shutting_down or payload is None:
            self._fail(
                request_id, ErrorCode.SHUTTING_DOWN, f"the engine stopped ({reason})", log=False
            )
            return FAILED
        if failovers > MAX_FAILOVERS:
            self._fail(
                request_id,
                ErrorCode.ENGINE_FAILED,
                f"the engines serving this request were lost {failovers} times (last: "
                f"{reason}); not resubmitted again",
                log=False,
            )
            return FAILED
        if not state.routing_policy.engines:  # none registered, or none healthy
            if state.failover_wait > 0:  # every replica looked lost at once: wait for one
                requests.orphans[request_id] = state.now + state.failover_wait
                if may_return:  # for its own engine first
                    requests.reserved[request_id] = (
                        state.now + RESERVED_TIMEOUTS * state.engine_timeout
                    )
                return WAITING
            self._fail(request_id, ErrorCode.NO_ENGINE, _no_engine_left(reason), log=False)
            return FAILED
        self.resubmit(request_id, dead, payload)
        return RESUBMITTED

    def resubmit(self, request_id: int, dead: bytes, payload: bytes) -> None:
        """Send a request of the dead engine ``dead`` (UNROUTED: of none yet), unchanged, to
        the routing policy's pick. If that send fails, the pick is gone too (its connection
        closed, its disconnect not yet processed): it is declared dead, and the request fails
        over again with the rest of what it held."""
        state = self.state
        engine = state.routing_policy.choose()
        state.requests.move(request_id, dead, engine)
        if state.tracks_load:
            state.routing_policy.on_resubmit(dead, engine, request_id)
        if dead is not UNROUTED:
            state.requests_resubmitted += 1
            self._abort_on_dead(dead, request_id)
        if not self.outbox.send_submit(engine, payload):
            self.engine_unreachable(engine, request_id)

    def _abort_on_dead(self, dead: bytes, request_id: int) -> None:
        """A dead engine of ours may still live: tell it to stop a request it no longer has
        (Megatron's engines know no ABORT). Requests that wait for it are left alone."""
        if self.state.registry.dead(dead) is not None:
            self.outbox.send_quietly(dead, encode([int(Headers.ABORT), request_id]))

    def waits_for_its_engine(self, request_id: int) -> bool:
        """Whether an orphan waits for its own (silent) engine alone: a stream only it can
        continue, or one still reserved for it."""
        requests = self.state.requests
        stream = requests.streams.get(request_id)
        if stream is not None and stream.tokens:
            return True
        return requests.reserved.get(request_id, 0.0) > self.state.now

    def send_orphans(self) -> None:
        """Engines can take requests: the orphans go to the routing policy's picks, but those
        that wait for their own engine. One whose send fails has its engine declared dead: the
        rest wait on if no engine is left."""
        state = self.state
        requests = state.requests
        orphans, requests.orphans = requests.orphans, {}
        sent = 0
        for request_id, deadline in orphans.items():
            engine = requests.engine_of.get(request_id)
            if engine is None:
                continue  # ended meanwhile
            if not state.routing_policy.engines or self.waits_for_its_engine(request_id):
                requests.orphans[request_id] = deadline
                continue
            requests.reserved.pop(request_id, None)
            self.resubmit(request_id, engine, requests.submitted[request_id])
            sent += 1
        if sent:
            logger.warning("sent %d request(s) that waited for an engine", sent)

    def release_reserved(self, now: float) -> None:
        """Orphans that waited for their own silent engine long enough: any engine may take
        them now (those registered at once)."""
        reserved = self.state.requests.reserved
        expired = [rid for rid, until in reserved.items() if until <= now]
        for request_id in expired:
            del reserved[request_id]
        if expired and self.state.routing_policy.engines:
            self.send_orphans()

    def expire_orphans(self, now: float) -> None:
        """Fail the requests that waited for an engine in vain (one log line per kind)."""
        state = self.state
        requests = state.requests
        expired = [rid for rid, deadline in requests.orphans.items() if deadline <= now]
        failed: Counter[str] = Counter()
        for request_id in expired:
            stream = requests.streams.get(request_id)
            if requests.engine_of.get(request_id) is UNROUTED:
                code = ErrorCode.NO_ENGINE
                why = f"no engine registered within {state.wait_for_engine:g} s; retry later"
            elif stream is not None and stream.tokens:  # it waited for its own engine
                code = ErrorCode.ENGINE_FAILED
                why = (
                    f"the engine serving this request fell silent after {len(stream.tokens)} "
                    f"token(s) were streamed to you and did not come back within "
                    f"{state.failover_wait:g} s; a partial generation cannot be resumed"
                )
            else:
                code = ErrorCode.NO_ENGINE
                why = _no_engine_left(f"no engine came back within {state.failover_wait:g} s")
            if self._fail(request_id, code, why, log=False):
                failed[code.value] += 1
        for code, count in failed.items():
            logger.warning(
                "%d request(s) waited for an engine in vain: failed with %s", count, code
            )


def _no_engine_left(reason: str) -> str:
    return f"the engine serving this request died ({reason}) and no other engine is registered"
