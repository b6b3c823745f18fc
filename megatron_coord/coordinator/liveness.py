"""Knowing when a peer of the coordinator's ROUTER is gone: socket events and heartbeat silence.

Two independent signals, because engines speak two protocols:

* ``PeerMonitor``: a ZMQ socket monitor on the ROUTER reports ``EVENT_DISCONNECTED`` with the
  file descriptor of the closed connection. The coordinator learns each peer's descriptor once,
  from the ``SRCFD`` property of its first frame (engine registration, client CONNECT), so the
  hot path never pays for it. This is the only way to notice the death of an engine that speaks
  Megatron-core 0.16's protocol (no heartbeats), and it notices a killed process at once (the
  kernel closes its sockets). ZMTP heartbeats on the ROUTER turn a silent peer (a machine that
  vanished without closing its TCP connection) into the same event, after twice the engine
  timeout: an engine of ours that only stopped (a long pause) is declared dead by its silence
  first, which may end (it may come back and keep what it holds: failover.py), while a closed
  connection is a process that is gone.
* ``SilenceClock``: engines of our protocol send HEARTBEAT load reports at the cadence the
  coordinator gave them at registration (liveness_contract.py); an
  engine from which nothing at all arrived for ``timeout`` seconds is declared dead even though
  its connection looks open (a hung process, a stuck step).

Neither class touches the coordinator's request maps: they only say *who* is gone.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable

import zmq

logger = logging.getLogger("megatron_coord.coordinator.liveness")

# Default seconds of silence after which an engine of our protocol is declared dead. Engines
# beat at a quarter of it (liveness_contract.py): four missed reports before a fail-over.
DEFAULT_ENGINE_TIMEOUT_S = 3.0
# A connection whose ZMTP pings go unanswered this many engine timeouts is closed.
ZMTP_TIMEOUTS = 2
_EVENT = struct.Struct("=HI")  # libzmq monitor event frame: uint16 event, uint32 value (fd)


class PeerMonitor:
    """Maps ROUTER peers to their connection's file descriptor and reports closed ones.

    ``learn(identity, fd)`` is called once per peer (at registration or CONNECT);
    ``disconnected()`` drains the monitor socket and returns the identities whose connection
    closed since the last call. A descriptor reused by a new connection is safe: the old
    connection's event is queued before its descriptor is closed, and ``learn`` drains the
    monitor before it records a new peer's descriptor.
    """

    def __init__(self, router: zmq.Socket, heartbeat_timeout_s: float) -> None:
        # ZMTP PINGs: a peer that stops answering them is disconnected (EVENT_DISCONNECTED),
        # later than an engine's silence is noticed (see the module docstring).
        ivl = max(100, int(heartbeat_timeout_s * 1000) // 3)
        router.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(ZMTP_TIMEOUTS * heartbeat_timeout_s * 1000))
        self.socket = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._fd_to_identity: dict[int, bytes] = {}
        # Public: the coordinator's hot loop reads it to tell known peers from new ones.
        self.identity_to_fd: dict[bytes, int] = {}
        self._gone: list[bytes] = []  # found by learn() before the coordinator asked

    def learn(self, identity: bytes, fd: int | None) -> None:
        """Remember which connection ``identity`` came in on (``fd`` from the frame's SRCFD)."""
        if fd is None or fd < 0:
            return
        self.forget(identity)
        # The kernel reuses a closed connection's descriptor at once, and that connection's
        # close event is queued before the descriptor is freed: take every queued event first,
        # so none is blamed on this peer (even one of a stranger that was never learned).
        self._gone += self._drain()
        previous = self._fd_to_identity.pop(fd, None)
        if previous is not None:  # its event was lost: it is gone all the same
            self.identity_to_fd.pop(previous, None)
            self._gone.append(previous)
        self._fd_to_identity[fd] = identity
        self.identity_to_fd[identity] = fd

    def forget(self, identity: bytes) -> None:
        """Stop watching ``identity`` (it left by other means)."""
        fd = self.identity_to_fd.pop(identity, None)
        if fd is not None and self._fd_to_identity.get(fd) == identity:
            del self._fd_to_identity[fd]

    @property
    def pending(self) -> bool:
        """Whether learn() already found closed connections the coordinator has not heard of."""
        return bool(self._gone)

    def disconnected(self) -> list[bytes]:
        """Identities whose connection closed (drains every queued monitor event)."""
        gone, self._gone = self._gone, []
        return gone + self._drain()

    def _drain(self) -> list[bytes]:
        gone: list[bytes] = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return gone
            if not frames or len(frames[0]) != _EVENT.size:
                continue
            event, fd = _EVENT.unpack(frames[0])
            if event != zmq.EVENT_DISCONNECTED:
                continue
            identity = self._fd_to_identity.pop(fd, None)
            if identity is not None:
                self.identity_to_fd.pop(identity, None)
                gone.append(identity)

    def close(self) -> None:
        self.socket.close(0)

    @property
    def sizes(self) -> dict[str, int]:
        """Map sizes (for the STATS debug view: they must not grow without bound)."""
        return {"peer_fds": len(self.identity_to_fd)}


class SilenceClock:
    """Last time each heartbeating engine was heard from; who has been silent too long.

    The coordinator asks at every wake-up, so the answer must not cost a pass over the
    engines: it keeps ``_floor``, a lower bound of the oldest last-heard time (times only move
    forward and new engines start at "now", so the bound stays true). While ``floor + timeout``
    lies ahead nobody can be silent, and both questions are O(1); the engines are scanned only
    when that moment passes, about once per timeout, never per message.
    """

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError("engine_timeout must be a positive number of seconds")
        self.timeout_s = timeout_s
        self._floor: float | None = None  # <= every last-heard time (None: not known)

    def next_deadline(self, last_seen: Iterable[float]) -> float | None:
        """The earliest moment one of the engines could be declared dead (None: none watched)."""
        if self._floor is None:
            self._floor = min(last_seen, default=None)
        return None if self._floor is None else self._floor + self.timeout_s

    def silent(self, last_seen: dict[bytes, float], now: float) -> list[bytes]:
        """Engines not heard from for longer than the timeout."""
        limit = now - self.timeout_s
        if self._floor is not None and self._floor >= limit:
            return []
        self._floor = min(last_seen.values(), default=None)
        if self._floor is None or self._floor >= limit:
            return []
        return [identity for identity, seen in last_seen.items() if seen < limit]
