"""An engine's death, and the one outcome of each request it held.

An engine is dead when its connection closes (socket monitor, any protocol), when a send to it
fails, when it says DISCONNECT (0.19), or, once it heartbeats, after ``engine_timeout`` seconds
without a single message. A dead engine gets no new request (one of ours is told to ABORT
what it held, in case it still lives), and each request it held gets exactly one outcome:
sent again, unchanged, to a live engine if nothing of it reached the client, else an
``engine_failed`` ERROR saying how much the client already received. With no
engine left (every replica looked lost at once), a request that could be resubmitted waits
``failover_wait`` seconds for one to register (or come back) before it fails with
``no_engine``; a new request admitted while no engine could take it waits ``wait_for_engine``
seconds alike. These waiting requests are the orphans; an engine joining adopts them
(engine_handlers.py).
"""

from __future__ import annotations

import logging

from ..protocol import ErrorCode, Headers
from .control import State019
from .control_rounds import ControlRounds
from .endings import RequestEndings
from .outbox import Outbox
from .requests import UNROUTED
from .state import CoordinatorState
from .wire import encode

logger = logging.getLogger("megatron_coord.coordinator")


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
            self._fail_over(request_id, engine, "the engine is unreachable")

    def engine_gone(self, identity: bytes, reason: str) -> None:
        """Declare an engine dead: no more routing; one outcome for each request it held."""
        state = self.state
        engine = state.registry.remove(identity)
        if engine is None:
            return
        state.monitor.forget(identity)
        if identity in state.routing_policy.engines:
            state.routing_policy.remove_engine(identity)
        held = state.requests.held_by(identity)
        stopped = engine.state_019 is State019.STOPPING  # a 0.19 engine leaving after STOP
        logger.log(
            logging.INFO if stopped else logging.ERROR,
            "engine %r (dp rank %s) is gone: %s; %d request(s) in flight on it; %d engine(s) left",
            identity,
            engine.data_parallel_rank,
            reason,
            len(held),
            len(state.registry.order),
        )
        abort = int(Headers.ABORT)
        for request_id in held:
            if engine.ours:  # if it still lives (Megatron's engines know no ABORT)
                self.outbox.send_quietly(identity, encode([abort, request_id]))
            self._fail_over(request_id, identity, reason)
        state.requests.forget_engine(identity)
        for header in state.control.engine_left(identity, self._rounds.awaited_from):
            self._rounds.all_acked(header)

    def _fail_over(self, request_id: int, dead: bytes, reason: str) -> None:
        """Send a dead engine's request to a live one, or fail it (exactly one outcome)."""
        state = self.state
        stream = state.requests.streams.get(request_id)
        if stream is not None and stream.tokens:
            self._fail(
                request_id,
                ErrorCode.ENGINE_FAILED,
                f"the engine serving this request died ({reason}) after {len(stream.tokens)} "
                "token(s) were streamed to you; a partial generation cannot be resumed",
            )
            return
        payload = state.requests.submitted.get(request_id)
        if state.shutdown.deadline is not None or payload is None:
            self._fail(request_id, ErrorCode.SHUTTING_DOWN, f"the engine stopped ({reason})")
            return
        if not state.routing_policy.engines:  # none registered, or none healthy
            if state.failover_wait > 0:  # every replica looked lost at once: wait for one
                state.requests.orphans[request_id] = state.now + state.failover_wait
                return
            self._fail(request_id, ErrorCode.NO_ENGINE, _no_engine_left(reason))
            return
        self.resubmit(request_id, dead, payload)

    def resubmit(self, request_id: int, dead: bytes, payload: bytes) -> None:
        """Send a request of the dead engine ``dead`` (UNROUTED: of none yet), unchanged, to
        the routing policy's pick."""
        state = self.state
        engine = state.routing_policy.choose()
        state.requests.move(request_id, dead, engine)
        if state.tracks_load:
            state.routing_policy.on_resubmit(dead, engine, request_id)
        if dead is not UNROUTED:
            state.requests_resubmitted += 1
        if not self.outbox.send_submit(engine, payload):
            self._fail(request_id, ErrorCode.ENGINE_FAILED, "no engine could take the request")

    def expire_orphans(self, now: float) -> None:
        """Fail the requests that waited for an engine in vain."""
        state = self.state
        expired = [rid for rid, deadline in state.requests.orphans.items() if deadline <= now]
        for request_id in expired:
            if state.requests.engine_of.get(request_id) is UNROUTED:
                why = f"no engine registered within {state.wait_for_engine:g} s; retry later"
            else:
                why = _no_engine_left(f"no engine came back within {state.failover_wait:g} s")
            self._fail(request_id, ErrorCode.NO_ENGINE, why)


def _no_engine_left(reason: str) -> str:
    return f"the engine serving this request died ({reason}) and no other engine is registered"
