"""What the coordinator does after each wake-up that no message asks for: its timers.

Closed connections (the socket monitor), engines silent too long, request deadlines, requests
that waited for an engine in vain (or for their own long enough), clients a send found gone,
and the graceful shutdown's drain and STOP round. ``poll_timeout_ms`` says how long the loop
may block until the next of these deadlines, so timers cost nothing while nothing is due.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..protocol import ErrorCode, Headers
from .control_rounds import ControlRounds
from .endings import RequestEndings
from .failover import Failover
from .outbox import Outbox
from .state import CoordinatorState
from .weight_updates import WeightUpdates

logger = logging.getLogger("megatron_coord.coordinator")


class AfterWakeup:
    """The work of a wake-up beyond its messages; ``client_gone`` forgets a vanished client
    and aborts its requests (client_handlers.py)."""

    def __init__(
        self,
        state: CoordinatorState,
        outbox: Outbox,
        endings: RequestEndings,
        rounds: ControlRounds,
        failover: Failover,
        client_gone: Callable[[bytes], None],
        updates: WeightUpdates,
    ) -> None:
        self.state = state
        self.outbox = outbox
        self._abort = endings.abort
        self._rounds = rounds
        self._failover = failover
        self._client_gone = client_gone
        self._updates = updates

    def poll_timeout_ms(self) -> int:
        """Milliseconds until the next deadline (-1: none, block until a message)."""
        state = self.state
        deadlines = [
            state.requests.deadlines.next_deadline(),
            state.registry.next_deadline(),
            state.shutdown.next_deadline(),
            min(state.requests.orphans.values(), default=None),
            min(state.requests.reserved.values(), default=None),
            self._updates.next_deadline(),
        ]
        upcoming = [d for d in deadlines if d is not None]
        if not upcoming:
            return -1
        return max(0, int((min(upcoming) - time.monotonic()) * 1000) + 1)

    def run(self, monitor_ready: bool) -> None:
        """Everything not driven by a message: closed connections, silence, deadlines."""
        state = self.state
        now = state.now
        # Silence first: an engine both silent and cut off in one wake-up may only have paused.
        for identity in state.registry.silent(now):
            self._failover.engine_gone(
                identity,
                f"no message from the engine for {state.engine_timeout:g} s",
                may_return=True,
            )
        if monitor_ready or state.monitor.pending:
            for identity in state.monitor.disconnected():
                if identity in state.registry.engines:
                    self._failover.engine_gone(identity, "the engine's connection closed")
                elif identity in state.clients:
                    self._client_gone(identity)
        if state.limits.request_timeout is not None:
            engine_of = state.requests.engine_of
            expired = state.requests.deadlines.expired(now, engine_of)
            for request_id in expired:
                self._abort(
                    request_id,
                    ErrorCode.TIMEOUT,
                    f"no result within the request timeout ({state.limits.request_timeout:g} s); "
                    "aborted",
                    log=False,
                )
            if expired:
                logger.warning("%d request(s) timed out: aborted", len(expired))
            state.requests.deadlines.compact(engine_of)
        if self._updates.round is not None:
            self._updates.check_deadline(now)
        if state.requests.orphans:
            self._failover.expire_orphans(now)
        if state.requests.reserved:
            self._failover.release_reserved(now)
        if self.outbox.gone_clients:
            for identity in self.outbox.take_gone_clients():
                self._client_gone(identity)
        if state.shutdown.requested:
            self._shut_down(now)

    def _shut_down(self, now: float) -> None:
        """A graceful shutdown, once requested: begin it, abort what is left after the grace,
        then STOP the engines (if asked) and end the loop."""
        state = self.state
        shutdown = state.shutdown
        if shutdown.begin():
            logger.warning(
                "shutting down: %d request(s) in flight get %g s to finish",
                len(state.requests),
                shutdown.grace_s,
            )
        if shutdown.deadline is not None and (not state.requests or now >= shutdown.deadline):
            left = list(state.requests.engine_of)
            for request_id in left:
                self._abort(
                    request_id,
                    ErrorCode.SHUTTING_DOWN,
                    "the coordinator is shutting down",
                    log=False,
                )
            if left:
                logger.warning("shutting down: %d request(s) unfinished after the grace", len(left))
            if shutdown.start_stop_round():
                self._stop_engines()
            elif shutdown.finished(now):
                state.running = False

    def _stop_engines(self) -> None:
        """The drain is over: STOP every engine (unless a client's STOP already went out);
        all_acked ends the loop once they all acked, ``finished`` if they never do."""
        if not self.state.control.stopping:
            self._rounds.relay(Headers.STOP)
