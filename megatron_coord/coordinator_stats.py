"""Asking the coordinator for its STATS (replica liveness and load), with a timeout.

``/health`` and ``/metrics`` need the coordinator's current view, not a cached one, and must
answer quickly even when the coordinator does not. A STATS reply carries no request id, so this
uses a DEALER socket of its own (separate from the inference client's) and one query at a time;
after a timeout the socket is replaced, so a late reply can never be taken for the answer to the
next query.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq
import zmq.asyncio

from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    Headers,
    ProtocolError,
    decode,
    encode,
)

log = logging.getLogger(__name__)


def is_serving(engine: Any) -> bool:
    """Whether a STATS ``engines`` entry takes requests: alive, and not reporting that its
    model steps keep failing (``"healthy": false`` in its load report)."""
    if not isinstance(engine, dict):
        return False
    load = engine.get("load") if isinstance(engine.get("load"), dict) else {}
    return engine.get("alive") is True and load.get("healthy") is not False


class CoordinatorStats:
    """Queries ``[STATS]`` on a coordinator; ``await query(timeout)`` -> dict or None."""

    def __init__(self, address: str, context: zmq.asyncio.Context | None = None) -> None:
        self.address = address
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._lock = asyncio.Lock()  # one query at a time (binds to a loop on first use)

    async def query(self, timeout_s: float) -> dict[str, Any] | None:
        """The coordinator's STATS dict, or None if it did not answer well within ``timeout_s``."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._ask(), timeout_s)
            except (asyncio.TimeoutError, zmq.ZMQError, ProtocolError) as exc:
                log.warning(
                    "STATS query to %s failed: %s", self.address, str(exc) or type(exc).__name__
                )
                self._reset()
                return None

    async def _ask(self) -> dict[str, Any]:
        sock = await self._connected_socket()
        await sock.send(encode([Headers.STATS]))
        while True:
            message = decode(await sock.recv())
            header = message[0]
            if header == Headers.STATS:
                if len(message) != 2 or not isinstance(message[1], dict):
                    raise ProtocolError(ErrorCode.MALFORMED, "STATS reply must be [STATS, dict]")
                return message[1]
            if header == Headers.ERROR:
                raise ProtocolError(
                    ErrorCode.MALFORMED, f"coordinator refused STATS: {message[1:]}"
                )
            # CONNECT_ACK (first query) and anything else: not our answer, keep reading.

    async def _connected_socket(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE_BYTES)
            sock.connect(self.address)
            # Say hello as a client of our protocol: STATS (header >= 100) is only for those.
            await sock.send(encode([Headers.CONNECT, {"protocol": PROTOCOL_VERSION}]))
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        """Close the socket (the next query opens a new one)."""
        self._reset()
