"""The client's side of a lost coordinator: ping when quiet, reconnect, resend, give up.

``InferenceClient`` (client.py) takes these methods as a base class; they work on its
connection state (``socket``, ``connected``, ``_requests``, ``_last_heard``, the timeouts) and
are kept apart because the reconnection rules are a concern of their own, read and tested
separately from the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from .protocol import Headers

logger = logging.getLogger("megatron_coord.client")

_encode = msgspec.msgpack.Encoder().encode


class Reconnection:
    """Connection-loss handling for ``InferenceClient`` (see the module docstring)."""

    async def _watchdog(self) -> None:
        """Ping a quiet coordinator; declare it lost after ``coordinator_timeout`` of silence,
        and fail what waits for it past ``reconnect_timeout``."""
        ping = _encode([int(Headers.HEARTBEAT)])
        woke = time.monotonic()
        while True:
            interval = self.ping_interval  # the coordinator may confirm a faster one
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            late = now - woke > interval  # this loop was blocked: silence proves nothing
            woke = now
            if self.stopped.is_set() or self.socket is None:
                continue  # after STOP_ACK the coordinator exits: not a loss
            if self.connected.is_set():
                silent = now - self._last_heard
                if silent >= interval:
                    self.socket.send(ping)
                if silent > self.coordinator_timeout and not late:
                    self._lose(f"no message from it for {silent:.1f} s")
            elif self._reconnect_deadline is not None and now >= self._reconnect_deadline:
                self._give_up()

    def _lose(self, why: str) -> None:
        """The coordinator is gone: a new connection, CONNECT queued, and (resubmit) every
        request that nothing of it reached the caller sent again behind it."""
        if not self.connected.is_set():
            return
        logger.warning("client: lost the coordinator at %s (%s); reconnecting", self.address, why)
        self.connected.clear()
        self.lost_reason = why
        self._reconnect_deadline = time.monotonic() + self.reconnect_timeout
        requests = self._requests
        for request_id in requests.partly_streamed():
            requests.fail(request_id, ConnectionError(self._lost_message(partial=True)))
        if not self.resubmit:
            for request_id in list(requests.submits):
                requests.fail(request_id, ConnectionError(self._lost_message()))
        self._replace_socket()
        if self.resubmit:
            self._resend()  # queued behind CONNECT: delivered once the coordinator is back

    def _resend(self) -> None:
        """Send every request in flight again (after a loss, behind the new CONNECT)."""
        for message in self._requests.submits.values():
            self.socket.send(message, copy=len(message) < 65536)

    def _give_up(self) -> None:
        """The reconnect deadline passed: fail what waits; new requests fail at once until the
        coordinator is back (a fresh connection carries only CONNECT, so nothing stale runs)."""
        self._reconnect_deadline = None
        waiting = list(self._requests.submits)
        for request_id in waiting:
            self._requests.fail(request_id, ConnectionError(self._unreachable()))
        if waiting:
            logger.error("client: %d request(s) failed: %s", len(waiting), self._unreachable())
        self._replace_socket()

    def _gave_up(self) -> bool:
        return not self.connected.is_set() and self._reconnect_deadline is None

    def _replace_socket(self) -> None:
        old, self.socket = self.socket, None
        if old is not None:
            old.close(0)
        if self.listener_task is not None:
            self.listener_task.cancel()
        for waiter in self._stats_waiters:
            waiter.cancel()
        self._stats_waiters.clear()
        self._requests.aborting.clear()
        sock = self._open_socket()
        self.listener_task = asyncio.get_running_loop().create_task(self._recv_task(sock))

    def _lost_message(self, partial: bool = False) -> str:
        what = "after part of it was streamed to you (a partial generation cannot be resumed)"
        if not partial:
            what = "and resubmission is off"
        return f"lost the coordinator at {self.address} ({self.lost_reason}) {what}"

    def _unreachable(self) -> str:
        why = f" ({self.lost_reason})" if self.lost_reason else ""
        return (
            f"the coordinator at {self.address} is unreachable{why}; gave up waiting after "
            f"{self.reconnect_timeout:g} s (the client reconnects by itself when it is back)"
        )
