"""A replica's control path: the coordinator's control signals, and the process's own shutdown
and drain.

* **Control signals.** PAUSE/UNPAUSE, SUSPEND/RESUME, STOP, the acks the coordinator sends
  every engine once all of them acked (PAUSE_ACK, STOP_ACK), ABORT of one request, and the
  TP-coordinator's own SHUTDOWN reach every rank of the group in a step's broadcast inputs
  (tp_broadcast.py) and are applied there alike (``apply``), so the replica's state is the same
  on every rank. The TP-coordinator acks PAUSE and STOP to the coordinator. Signals with
  options (payload signals: ``[SUSPEND, {"offload_weights": true}]``, a weight update, a
  generation epoch) go to the handler registered for their header (``payload_handlers``).
* **Shutdown.** SIGINT/SIGTERM, another thread (``request_shutdown``) or a lost coordinator
  (coordinator_link.py) ask the loop to end: the TP-coordinator broadcasts SHUTDOWN at its next
  step. A wake-up socket, polled with the coordinator's, ends its idle wait at once.
* **Drain.** A launch's own coordinator drains on SIGTERM and then STOPs every engine: with
  ``drain_s``, a first SIGTERM/SIGINT keeps this replica serving (``on_drain``, rank 0: pass it
  on to the coordinator) until that STOP, or ``drain_s`` at most; a second ends it at once.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from ..protocol import Headers
from .coordinator_link import CoordinatorLink
from .engine import InferenceEngine
from .tp_broadcast import ABORT_SIGNAL, PAYLOAD_SIGNAL, SHUTDOWN_SIGNAL, read_payload

log = logging.getLogger(__name__)

DRAIN_SILENCE_S = 3.0  # a draining replica whose coordinator is silent this long leaves

# What the TP-coordinator passes on from the coordinator to its group as they are.
FORWARDED_SIGNALS = frozenset(
    {
        Headers.PAUSE,
        Headers.UNPAUSE,
        Headers.SUSPEND,
        Headers.RESUME,
        Headers.STOP,
        Headers.PAUSE_ACK,
        Headers.STOP_ACK,
    }
)


class ReplicaControl:
    """What the control signals made of the replica, and whether (and when) it should end."""

    def __init__(
        self,
        engine: InferenceEngine,
        rank: int,
        drain_s: float | None = None,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.rank = rank
        # Identical on every rank of the group (changed only by broadcast inputs).
        self.paused = False
        self.stop_received = False
        self.done = False
        # TP-coordinator only: shutdown requests (signals, another thread, a lost coordinator).
        self.shutdown_requested = False
        self.drain_s = drain_s
        self.on_drain = on_drain
        self.drain_deadline: float | None = None
        self._drain_started = 0.0
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # Header -> handler(payload) of the payload signals (on every rank alike).
        self.payload_handlers: dict[int, Callable[[Any], None]] = {
            int(Headers.SUSPEND): self._suspend_with_options
        }

    @property
    def halted(self) -> bool:
        """Paused, suspended, stopped or its weights broken by a failed update: the engine
        keeps its requests but runs none."""
        engine = self.engine
        return (
            self.paused
            or engine.suspended
            or self.stop_received
            or engine.weights_broken is not None
        )

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    # ----------------------------------------------------------------- control signals
    def apply(self, signals: list[int], reply: Callable[[list[Any]], None] | None) -> None:
        """Apply one step's signals in order; identical on every rank of the group. ``reply``
        sends the acks to the coordinator (the TP-coordinator's; None on other ranks)."""
        i = 0
        while i < len(signals):
            sig = signals[i]
            if sig == ABORT_SIGNAL and i + 1 < len(signals):
                self.engine.abort(signals[i + 1])
                i += 2
                continue
            if sig == PAYLOAD_SIGNAL:
                header, payload, i = read_payload(signals, i)
                handler = self.payload_handlers.get(header)
                if handler is None:
                    log.warning("rank %d: no handler for payload signal %d", self.rank, header)
                else:
                    handler(payload)
                continue
            self._apply_signal(sig, reply)
            i += 1

    def _apply_signal(self, sig: int, reply: Callable[[list[Any]], None] | None) -> None:
        if sig == SHUTDOWN_SIGNAL or sig == Headers.STOP_ACK:
            self.done = True
        elif sig == Headers.PAUSE:
            self.paused = True
            if reply is not None:
                reply([Headers.PAUSE_ACK])
        elif sig == Headers.UNPAUSE:
            self.paused = False
        elif sig == Headers.SUSPEND:
            self.engine.suspend()
        elif sig == Headers.RESUME:
            self.engine.resume()
        elif sig == Headers.STOP:
            self.stop_received = True
            if reply is not None:
                reply([Headers.STOP_ACK])

    def _suspend_with_options(self, options: Any) -> None:
        """Ours: ``[SUSPEND, {"offload_weights": bool}]`` (a bare SUSPEND frees the KV only)."""
        offload = isinstance(options, dict) and options.get("offload_weights") is True
        self.engine.suspend(offload_weights=offload)

    def undo_halt(self) -> list[int]:
        """The signals that undo a pause or a suspension (for a coordinator that never sent
        them: a replica registering afresh)."""
        signals = []
        if self.paused:
            signals.append(int(Headers.UNPAUSE))
        if self.engine.suspended:
            signals.append(int(Headers.RESUME))
        return signals

    # ----------------------------------------------------------------- shutdown and drain
    def install_signal_handlers(self, link: CoordinatorLink | None) -> None:
        """SIGINT/SIGTERM ask for a clean shutdown; on the TP-coordinator (``link``), a
        wake-up socket interrupts the idle poll."""
        if link is not None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            link.also_poll(self._wake_r)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.drain_s is None or self.drain_deadline is not None:
            log.info("rank %d: signal %d, shutting down", self.rank, signum)
            self.shutdown_requested = True
            return
        log.info(
            "rank %d: signal %d, serving while the coordinator drains (%g s at most)",
            self.rank,
            signum,
            self.drain_s,
        )
        self._drain_started = time.monotonic()
        self.drain_deadline = self._drain_started + self.drain_s
        if self.on_drain is not None:
            self.on_drain()

    def request_shutdown(self) -> None:
        """Ask the loop to end at its next step (safe from another thread)."""
        self.shutdown_requested = True

    def clear_wakeups(self, events: dict[Any, int]) -> None:
        """Empty the wake-up socket if a signal woke the poll (``events``: the poll's)."""
        if self._wake_r is not None and self._wake_r in events:
            try:
                while self._wake_r.recv(64):
                    pass
            except BlockingIOError:
                pass

    def check_drain(self, last_heard: float) -> None:
        """Draining: leave at the drain's end without a STOP, or once the coordinator has
        been silent for DRAIN_SILENCE_S since ``last_heard`` (it died: torchrun is tearing
        the world down after another rank failed, and no STOP will ever come)."""
        now = time.monotonic()
        silent = now - max(last_heard, self._drain_started)  # heartbeats are answered
        if now <= self.drain_deadline and silent <= DRAIN_SILENCE_S:
            return
        if not self.shutdown_requested:
            why = (
                "no STOP by the end of the drain"
                if silent <= DRAIN_SILENCE_S
                else (f"the coordinator has been silent for {silent:.1f} s")
            )
            log.warning("rank %d: %s; exiting", self.rank, why)
        self.shutdown_requested = True

    def close(self) -> None:
        if self._wake_w is not None:
            signal.set_wakeup_fd(-1)
            self._wake_w.close()
            self._wake_r.close()
            self._wake_w = self._wake_r = None
