"""Graceful shutdown on SIGTERM/SIGINT: new requests are refused with ``shutting_down``, those
in flight get ``shutdown_grace`` seconds to finish, then fail with ``shutting_down``.

Signal handlers only set a flag and write to a socketpair that the coordinator's poll watches,
so the loop wakes at once (``signal.set_wakeup_fd``); everything else happens in the loop.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

DEFAULT_SHUTDOWN_GRACE_S = 10.0


class GracefulShutdown:
    """The shutdown request, its wake-up socket and the grace deadline."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = float(grace_s)
        self.requested = False
        self.deadline: float | None = None  # set once the shutdown began
        self.wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    @property
    def active(self) -> bool:
        """Requested or begun: new requests are refused."""
        return self.requested or self.deadline is not None

    def request(self) -> None:
        """Begin a graceful shutdown at the next wake-up (safe from a signal handler)."""
        self.requested = True

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT request the shutdown (main thread only); the poll wakes at once."""
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request()

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
