"""Heartbeats while a model step runs, so a replica that is busy is not taken for dead.

The serving loop heartbeats between steps; a step that lasts longer than the coordinator's
``engine_timeout`` (a long prefill on a big model, a first step that compiles) would otherwise
look like silence. A thread of the TP-coordinator process wakes every half ``interval_s`` and,
while a step runs and no heartbeat (its own or the loop's) went out for ``interval_s``, sends
one HEARTBEAT (torch releases the GIL in its kernels, so the thread runs while the step
computes). ``interval_s`` is the cadence the coordinator gave at registration
(liveness_contract.py), so the longest silence during a step is 1.5 intervals.

A step that never ends (a deadlock, a collective whose peer is gone) must still be noticed: the
thread stops beating once a step has run ``max_step_s``, and the coordinator declares the
replica dead ``engine_timeout`` later. A stopped or killed process beats no more at all, so
SIGSTOP and kill -9 are seen exactly as before.

The socket is the serving loop's. The loop never touches it while a step runs, and marks the
step's start and end under the same lock the thread sends under, so the two never use it at
once (a mutex is the hand-over ZMQ asks for when a socket changes threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEFAULT_MAX_STEP_S = 600.0


class StepHeartbeat:
    """Calls ``beat(seconds the step has run)`` every ``interval_s`` during long steps.

    ``set_interval`` changes it (the coordinator's cadence); ``note_beat`` tells of a heartbeat
    the loop sent."""

    def __init__(self, beat: Callable[[float], None], interval_s: float, max_step_s: float) -> None:
        if not interval_s > 0 or not max_step_s > 0:
            raise ValueError("the heartbeat interval and max step time must be positive")
        self.interval_s = interval_s
        self.max_step_s = max_step_s
        self._beat = beat
        self._lock = threading.Lock()
        self._started: float | None = None
        self._last_beat = time.monotonic()  # a float store: safe from either thread
        self._closed = False
        self._wake = threading.Event()  # ends the thread's wait early (new interval, close)
        self._thread = threading.Thread(target=self._run, name="step-heartbeat", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        """A step starts (the serving loop leaves the socket to this thread)."""
        with self._lock:
            self._started = time.monotonic()

    def end(self) -> None:
        """The step ended (the socket is the serving loop's again)."""
        with self._lock:
            self._started = None

    def note_beat(self) -> None:
        """The serving loop sent a heartbeat."""
        self._last_beat = time.monotonic()

    def set_interval(self, interval_s: float) -> None:
        """Beat every ``interval_s`` from now on (the thread's current wait ends at once)."""
        self.interval_s = interval_s
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s / 2)
            self._wake.clear()
            if self._closed:
                return
            with self._lock:
                if self._started is None:
                    continue
                now = time.monotonic()
                running = now - self._started
                if now - self._last_beat >= self.interval_s and running <= self.max_step_s:
                    self._beat(running)
                    self._last_beat = now

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5.0)
