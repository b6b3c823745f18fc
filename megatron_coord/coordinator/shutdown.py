"""Graceful shutdown on SIGTERM/SIGINT: new requests are refused with ``shutting_down``, those
in flight get ``shutdown_grace`` seconds to finish, then fail with ``shutting_down``.

SIGHUP ends it at once instead (a grace of 0): a launch's coordinator gets it when the rank
that spawned it dies (``megatron_coord.lifetime``), and nobody is left to finish its requests
then; an alarm ends the process if the loop does not within ``HANGUP_EXIT_S``. With
``stop_engines`` (a launch's own coordinator) the end of a graceful drain is a STOP round: every
engine is sent STOP and, once all acked or ``STOP_ROUND_S`` passed, STOP_ACK, so the ranks of
the launch end their loops too, even those that only have a socket.

Signal handlers only set a flag and write to a socketpair that the coordinator's poll watches,
so the loop wakes at once (``signal.set_wakeup_fd``); everything else happens in the loop.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

DEFAULT_SHUTDOWN_GRACE_S = 10.0
STOP_ROUND_S = 5.0  # after the drain: how long engines get to acknowledge STOP
HANGUP_EXIT_S = 3  # after SIGHUP: the process ends by SIGALRM if the loop has not by then


class GracefulShutdown:
    """The shutdown request, its wake-up socket and the grace deadline."""

    def __init__(self, grace_s: float, stop_engines: bool = False) -> None:
        self.grace_s = float(grace_s)
        self.stop_engines = stop_engines
        self.requested = False
        self.urgent = False  # SIGHUP: no grace, no STOP round
        self.deadline: float | None = None  # set once the shutdown began
        self.stop_deadline: float | None = None  # set once the STOP round began
        self.wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    @property
    def active(self) -> bool:
        """Requested or begun: new requests are refused."""
        return self.requested or self.deadline is not None

    def request(self) -> None:
        """Begin a graceful shutdown at the next wake-up (safe from a signal handler)."""
        self.requested = True

    def hurry(self) -> None:
        """End now: fail what is in flight and exit, without a STOP round (safe from a signal
        handler). Also cuts short a graceful shutdown already under way."""
        self.urgent = True
        self.grace_s = 0.0
        if self.deadline is not None:
            self.deadline = time.monotonic()
        self.requested = True

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT request the shutdown, SIGHUP hurries it (main thread only); the
        poll wakes at once."""
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request()

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self.hurry()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # its default action ends the process
        signal.alarm(HANGUP_EXIT_S)

    def next_deadline(self) -> float | None:
        """When the loop must wake next for the shutdown: the grace's end, then the STOP
        round's (None: neither pending)."""
        return self.stop_deadline if self.stop_deadline is not None else self.deadline

    def start_stop_round(self) -> bool:
        """Whether the drained coordinator should STOP its engines now (once, not urgent)."""
        if not self.stop_engines or self.urgent or self.stop_deadline is not None:
            return False
        self.stop_deadline = time.monotonic() + STOP_ROUND_S
        return True

    def finished(self, now: float) -> bool:
        """Drained and, where one runs, the STOP round over (acked, or out of time)."""
        return self.stop_deadline is None or self.urgent or now >= self.stop_deadline

    def drain_wakeups(self) -> None:
        try:
            while self.wake_r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def begin(self) -> bool:
        """Start the grace period if a shutdown was requested; True the first time."""
        if not self.requested or self.deadline is not None:
            return False
        self.deadline = time.monotonic() + self.grace_s
        return True

    def close(self) -> None:
        if self._wake_w is not None:
            signal.set_wakeup_fd(-1)
            self._wake_w.close()
            self.wake_r.close()
            self._wake_w = self.wake_r = None
