"""A replica's HEARTBEATs: the load report they carry, and when the TP-coordinator sends them.

The coordinator shows the reports in STATS, routes by them (least_loaded, prefix_aware: the KV
blocks stored and evicted since the last report) and takes their silence for death, so it sets
their cadence: ``interval_s`` is the replica's own until REGISTER_ACK gives the one to keep
(``adopt``; liveness_contract.py). Between steps the serving loop sends one every
``interval_s`` once the coordinator has spoken (its REGISTER_ACK; a refused replica never
beats), and a draining one from the start, since the coordinator's answers are how it tells a
lost coordinator from a quiet one (coordinator_link.py, control.py). While a step runs longer
than the interval, the step-heartbeat thread sends the same report, without block events
(step_heartbeat.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import zmq

from ..protocol import Headers, encode
from .control import ReplicaControl
from .coordinator_link import CoordinatorLink
from .engine import InferenceEngine, StepResult
from .step_guard import StepGuard
from .step_heartbeat import StepHeartbeat


@dataclass
class StepCounters:
    """What the replica's steps did, cumulatively (the coordinator can tell from them which
    progress its replies did not show)."""

    steps: int = 0
    generated_tokens: int = 0
    processed_tokens: int = 0  # prompt tokens prefilled + tokens generated

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.generated_tokens += result.tokens
        self.processed_tokens += result.tokens + result.prefill_tokens


class Heartbeats:
    """Builds load reports; on the TP-coordinator (``link``), sends them as HEARTBEATs."""

    def __init__(
        self,
        engine: InferenceEngine,
        data_parallel_rank: int,
        counters: StepCounters,
        control: ReplicaControl,
        guard: StepGuard,
        link: CoordinatorLink | None,
        interval_s: float | None,
        max_step_s: float,
        heartbeat_reply: bool,
    ) -> None:
        self.engine = engine
        self.data_parallel_rank = data_parallel_rank
        self.counters = counters
        self.control = control
        self.guard = guard
        self.link = link
        self.interval_s = interval_s  # None: never sent
        # Joined: a re-registration by HEARTBEAT keeps asking for answers.
        self.heartbeat_reply = heartbeat_reply
        self._next_at = 0.0
        self.during_steps: StepHeartbeat | None = None
        if link is not None and interval_s is not None:
            self.during_steps = StepHeartbeat(self._beat_during_step, interval_s, max_step_s)

    def report(self, block_events: bool = True) -> dict[str, Any]:
        """What this replica tells the coordinator in a HEARTBEAT: load, prefix-cache stats
        and (``block_events``: between steps only, never from the step-heartbeat thread)
        the KV blocks stored and evicted since the last report."""
        engine = self.engine
        blocks = engine.blocks
        counters = self.counters
        free_kv = min(
            len(engine.free_slots) * engine.max_seq_len, blocks.available * blocks.block_size
        )
        report = {
            "data_parallel_rank": self.data_parallel_rank,
            "queued": len(engine.waiting),
            "active": len(engine.active),
            "free_slots": len(engine.free_slots),
            "free_kv_tokens": free_kv,
            "steps": counters.steps,
            "generated_tokens": counters.generated_tokens,
            # Cumulative, so the coordinator can tell which progress its replies did not show.
            "processed_tokens": counters.processed_tokens,
            "paused": self.control.paused,
            "suspended": engine.suspended,
            # False: its model steps keep failing, or an update left its weights mixed
            "healthy": self.guard.healthy and engine.weights_broken is None,
            "failed_steps": self.guard.failed_steps,
            **blocks.stats(),
            # Its weights (weight_updates.py) and the memory it holds (suspension.py).
            "weight_version": engine.weight_version,
            "kv_bytes": engine.kv_bytes,
            "weight_bytes": engine.weight_bytes,
            "weights_offloaded": engine.weights_offloaded,
        }
        if engine.weights_broken is not None:
            report["update_error"] = engine.weights_broken
        if block_events:
            report.update(blocks.drain_events())
        if self.heartbeat_reply:
            report["heartbeat_reply"] = True
        return report

    def soon(self) -> None:
        """Send the next report at the next chance (health changed, registered again)."""
        self._next_at = 0.0

    def adopt(self, interval_s: float) -> None:
        """Beat every ``interval_s`` from now on, also during steps (the coordinator's word)."""
        self.interval_s = interval_s
        if self.during_steps is not None:
            self.during_steps.set_interval(interval_s)
        self._next_at = min(self._next_at, time.monotonic() + interval_s)

    def _due(self) -> bool:
        """Whether heartbeats go out at all now (see the module docstring)."""
        link = self.link
        return (
            self.interval_s is not None
            and link is not None
            and not link.lost
            and (link.heard or self.control.draining)
        )

    def due_in_ms(self) -> int | None:
        """Milliseconds until the next report is due (None: none will be), so an idle loop
        wakes for it."""
        if not self._due():
            return None
        return max(0, int((self._next_at - time.monotonic()) * 1000) + 1)

    def between_steps(self) -> None:
        """TP-coordinator, once per loop iteration: a HEARTBEAT when one is due."""
        if not self._due():
            return
        now = time.monotonic()
        if now >= self._next_at:
            self._next_at = now + self.interval_s
            self.link.send([Headers.HEARTBEAT, self.report()])
            if self.during_steps is not None:
                self.during_steps.note_beat()

    def _beat_during_step(self, running_s: float) -> None:
        """From the step-heartbeat thread, while a step runs (the loop leaves the socket
        alone then): the same HEARTBEAT, once the coordinator has spoken, never blocking."""
        link = self.link
        if link.socket is None or not link.heard or link.lost:
            return
        report = self.report(block_events=False)
        report["step_running_s"] = round(running_s, 3)
        with contextlib.suppress(zmq.Again):
            link.socket.send(encode([Headers.HEARTBEAT, report]), zmq.NOBLOCK)

    def close(self) -> None:
        if self.during_steps is not None:
            self.during_steps.close()
            self.during_steps = None
