"""The TP-coordinator's link to the coordinator: its DEALER socket, registration, and losing
and regaining the coordinator.

A launch's replicas register once with the coordinator rank 0 spawned, and their loop ends if
that process dies. A replica that joined an outside coordinator (launch --coordinator-address;
``coordinator_timeout_s`` set) cannot see the process, so it watches the link instead:

* **Join.** The replica has joined once the coordinator answers (REGISTER_ACK: the heartbeat
  cadence to keep, see liveness_contract.py; a refusal ends the replica with a configuration
  error); with no answer within ``join_timeout_s`` of a (re-)registration the link is lost.
* **Loss.** No message and no answer to its heartbeats for ``coordinator_timeout_s``, or a
  message that cannot leave for as long (SNDTIMEO): the coordinator is lost. The replica exits
  (non-zero), or with ``reconnect`` registers again, every ``coordinator_timeout_s``, so a
  restarted coordinator gets it back.
* **Not known.** Answered ``not_connected`` (the coordinator restarted at the same address, or
  declared this replica dead while it lived: a launch's replicas too): it registers again.

Each registration connects a fresh socket under a fresh identity. What becomes of the requests
the replica holds is the serving loop's business (rejoining.py: they are listed in the new
REGISTER and kept unless the coordinator says otherwise), not this module's: it only says when
to register again (``reconnect_pending``) and does it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

import zmq

from ..parallel_state import ParallelState
from ..protocol import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Headers, encode
from .kv_blocks import BlockPool

log = logging.getLogger(__name__)

DEFAULT_JOIN_TIMEOUT_S = 60.0


def engine_identity(data_parallel_rank: int) -> bytes:
    """The DEALER identity of a replica's TP-coordinator."""
    return b"mp-coord-%d" % data_parallel_rank


def joined_identity(data_parallel_rank: int) -> bytes:
    """A fresh identity for each registration of a joined replica: a restarted replica, another
    job, or this replica registering again never reuses one (a ROUTER ignores a connection
    whose identity a closing one still holds)."""
    return engine_identity(data_parallel_rank) + b"-" + os.urandom(4).hex().encode()


class CoordinatorLink:
    """The socket to the coordinator, and whether the coordinator is there (TP-coordinator)."""

    def __init__(
        self,
        state: ParallelState,
        blocks: BlockPool,
        address: str,
        identity: bytes,
        request_shutdown: Callable[[], None],
        coordinator_alive: Callable[[], bool] | None = None,
        coordinator_timeout_s: float | None = None,
        auth_keys: str | None = None,
        reconnect: bool = False,
        join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
        on_joined: Callable[[], None] | None = None,
        describe: Callable[[], dict[str, Any]] | None = None,
        heartbeat_interval_s: float | None = None,
        heartbeat_interval_fixed: bool = False,
    ) -> None:
        self.state = state
        self.describe = describe  # more for REGISTER (the replica's weights), at each one
        # What REGISTER says of this replica's heartbeats (the coordinator answers the cadence).
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_interval_fixed = heartbeat_interval_fixed
        self.blocks = blocks  # its block size and caching go into REGISTER
        self.address = address
        self.identity = identity
        # Called when the link is lost for good: the replica's loop ends.
        self._request_shutdown = request_shutdown
        # Rank 0 owns a launch's coordinator process: if it dies before STOP, the replica must
        # not wait forever on a socket nobody will ever write to.
        self.coordinator_alive = coordinator_alive
        # Joined an outside coordinator: the replica asks for answers to its heartbeats, and
        # gives up (or registers again) after coordinator_timeout_s of silence.
        self.outside = coordinator_timeout_s is not None
        self.coordinator_timeout_s = coordinator_timeout_s
        self.auth_keys = auth_keys
        self.reconnect = reconnect
        self.reconnect_pending = False  # lost or not known: register again between steps
        self.lost = False
        self.lost_reason: str | None = None  # why, when lost
        self.refused = False  # the coordinator refused this replica (its settings): lost too
        # Heard: any message since the first registration (a launch's replicas heartbeat only
        # then). Answered: a message other than not_connected since the last one (joined).
        self.heard = False
        self.answered = False
        self.joined = False
        self.join_timeout_s = join_timeout_s
        self.on_joined = on_joined  # told each time the replica has (re-)joined
        self.last_heard = time.monotonic()
        self._also_polled: list[Any] = []  # polled with the socket, on every socket
        self.connect()

    def connect(self, fields: dict[str, Any] | None = None) -> None:
        """A fresh socket and poller under ``identity``, then REGISTER (with ``fields``)."""
        self.context = zmq.Context()
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 2000)
        if self.coordinator_timeout_s is not None:
            # Joined: a send that cannot leave (no connection, e.g. refused by CURVE) must not
            # block the replica forever.
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.coordinator_timeout_s * 1000)))
        if self.auth_keys is not None:
            from ..auth import apply_client

            apply_client(sock, self.auth_keys)
        sock.connect(self.address)
        self.socket: zmq.Socket | None = sock
        # A link dropped without close() (an in-process server its owner forgot) still closes
        # its socket before its context: left to the cyclic garbage collector, the context can
        # be finalized first, and its term() then waits forever for the socket.
        self._finalizer = weakref.finalize(self, _close_quietly, sock, self.context)
        self._registered_at = time.monotonic()
        self._join_deadline = self._registered_at + self.join_timeout_s
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        for other in self._also_polled:
            self.poller.register(other, zmq.POLLIN)
        # A (new) coordinator knows nothing of our cache: the next report lists all of it.
        self.blocks.request_snapshot()
        self.send([Headers.REGISTER, {**self.registration(), **(fields or {})}])

    def registration(self) -> dict[str, Any]:
        """What REGISTER tells the coordinator about this replica."""
        # Answers to our heartbeats tell a lost coordinator from a quiet one (joined replicas;
        # a launch's replicas while they drain).
        info: dict[str, Any] = {
            "data_parallel_rank": self.state.dp_rank,
            "protocol": PROTOCOL_VERSION,
            "heartbeat_reply": True,
            # How to name this replica's KV blocks (prefix_hash.block_hashes), and whether it
            # caches them at all.
            "kv_block_size": self.blocks.block_size,
            "prefix_caching": self.blocks.caching,
            # Its own heartbeat interval (None: it never beats), and whether its user set it:
            # REGISTER_ACK says the cadence to keep, or refuses it (liveness_contract.py).
            "heartbeat_interval": self.heartbeat_interval_s,
            "heartbeat_interval_fixed": self.heartbeat_interval_fixed,
        }
        if self.outside:  # joined: say who we are
            info.update(pid=os.getpid(), host=socket.gethostname())
        if self.describe is not None:
            info.update(self.describe())
        return info

    def also_poll(self, other: Any) -> None:
        """Poll ``other`` (a file-like socket) with the coordinator's socket from now on."""
        self._also_polled.append(other)
        self.poller.register(other, zmq.POLLIN)

    def send(self, message: list[Any]) -> None:
        assert self.socket is not None
        try:
            self.socket.send(encode(message))
        except zmq.Again:  # only with SNDTIMEO (joined replicas)
            self.lose(
                f"a message could not be sent for {self.coordinator_timeout_s:g} s (not "
                "running, or refusing our key?)"
            )

    def note_heard(self) -> None:
        """Messages arrived (noted once per drain of the socket)."""
        self.heard = True
        self.last_heard = time.monotonic()

    def lose(self, why: str) -> None:
        """The coordinator is gone: exit (non-zero), or with ``reconnect`` register again."""
        if self.lost or self.reconnect_pending:
            return
        if self.reconnect:
            log.warning(
                "rank %d: lost the coordinator at %s: %s; keeping this replica's requests and "
                "waiting to register again (the coordinator says which to drop)",
                self.state.rank,
                self.address,
                why,
            )
            self.reconnect_pending = True
            return
        log.error(
            "rank %d: lost the coordinator at %s: %s; exiting", self.state.rank, self.address, why
        )
        self.lost = True
        self.lost_reason = f"lost the coordinator at {self.address}: {why}"
        self._request_shutdown()

    def watch(self) -> None:
        """Joined replicas, between steps (until STOP): the join's deadline, then silence."""
        if not self.joined:
            self._await_join()
            return
        silent = time.monotonic() - self.last_heard
        if silent > self.coordinator_timeout_s:
            self.lose(f"no message and no answer to our heartbeats for {silent:.1f} s")

    def _await_join(self) -> None:
        """Not yet answered: report the join once the coordinator spoke, or give up (exit)
        once ``join_timeout_s`` passed without a word."""
        if self.lost:
            return
        if self.answered:
            self.joined = True
            self.last_heard = time.monotonic()
            if self.on_joined is not None:
                self.on_joined()
            return
        if time.monotonic() > self._join_deadline:
            self.lost_reason = (
                f"could not reach the coordinator at {self.address} within "
                f"{self.join_timeout_s:g} s (is it running there, and does it accept our key?)"
            )
            log.error("rank %d: %s; exiting", self.state.rank, self.lost_reason)
            self.lost = True
            self._request_shutdown()

    def watch_process(self, exit_expected: bool) -> None:
        """A launch's own coordinator process: its death ends the replica, lost unless
        ``exit_expected`` (after STOP, or while draining)."""
        if self.coordinator_alive is None or self.coordinator_alive():
            return
        if not exit_expected:
            log.error("rank %d: the coordinator process died", self.state.rank)
            self.lost = True
        self._request_shutdown()

    def refuse(self, why: str) -> None:
        """The coordinator refused this replica's registration (REGISTER_ACK): it cannot keep
        the liveness contract as configured. The replica ends (a configuration error)."""
        self.lost_reason = f"the coordinator at {self.address} refused this replica: {why}"
        log.error("rank %d: %s", self.state.rank, self.lost_reason)
        self.lost = self.refused = True
        self.answered = False  # it never joined
        self._request_shutdown()

    def not_known(self) -> None:
        """The coordinator answers us as a stranger: it restarted at the same address, or it
        declared this replica dead (a launch's own coordinator too, once it had heard us).
        Register afresh (at most once a second)."""
        if self.reconnect_pending or not (self.outside or self.heard):
            return
        if time.monotonic() - self._registered_at < 1.0:
            return
        log.warning(
            "rank %d: the coordinator at %s does not know this replica; registering again",
            self.state.rank,
            self.address,
        )
        self.reconnect_pending = True

    def register_again(self, fields: dict[str, Any]) -> None:
        """A fresh socket under a fresh identity, and REGISTER with ``fields`` (what the
        replica holds): not joined until answered."""
        self.reconnect_pending = False
        self.joined = self.answered = False
        self._finalizer.detach()
        self.socket.close(0)
        self.context.term()
        self.last_heard = time.monotonic()
        self.identity = joined_identity(self.state.dp_rank)
        self.connect(fields)

    def close(self) -> None:
        if self.socket is not None:
            self._finalizer.detach()
            self.socket.close()
            self.context.term()
            self.socket = None


def _close_quietly(sock: zmq.Socket, context: zmq.Context) -> None:
    """The finalizer of a link never closed: nothing can be delivered any more, so no linger."""
    sock.close(0)
    context.term()
