"""How a request leaves the coordinator: freed on its result, failed, or aborted.

Each request has exactly one outcome. ``free`` forgets it everywhere (the request table and
the routing policy's accounting) and says whom to answer; ``fail`` also sends the client its
ERROR; ``abort`` also tells the engine holding it to stop (engines of ours only: Megatron's
know no ABORT).
"""

from __future__ import annotations

import logging
from typing import Any

from ..protocol import ErrorCode, Headers
from .outbox import Outbox
from .state import CoordinatorState
from .wire import encode

logger = logging.getLogger("megatron_coord.coordinator")


class RequestEndings:
    """free / fail / abort, over the shared state and the outbox."""

    def __init__(self, state: CoordinatorState, outbox: Outbox) -> None:
        self.state = state
        self._free_request = state.requests.free
        self._send_error = outbox.send_error
        self._send_quietly = outbox.send_quietly

    def free(self, request_id: int, generated: int | None = None) -> tuple[bytes, Any] | None:
        """Forget a request; returns (client identity, client_request_id), None if it ended.

        ``generated``: tokens in its final record (for the routing policy's accounting)."""
        ended = self._free_request(request_id)
        if ended is None:
            return None
        client, client_request_id, engine = ended
        state = self.state
        if state.tracks_load:
            state.routing_policy.on_finish(engine, request_id, generated)
        return client, client_request_id

    def fail(self, request_id: int, code: ErrorCode, text: str, log: bool = True) -> bool:
        """End a request with an ERROR to its client and free its state; whether it was still
        in flight. ``log=False``: the caller logs one line for many (an event, with counts)."""
        ended = self.free(request_id)
        if ended is None:
            return False
        if log:
            logger.warning("request %d failed: %s", request_id, text)
        self._send_error(ended[0], ended[1], code, text)
        return True

    def abort(
        self, request_id: int, code: ErrorCode | None = None, text: str = "", log: bool = True
    ) -> None:
        """ABORT a request on its engine and end it: with an ERROR ``code`` to its client, or
        (None: the client is gone) silently."""
        state = self.state
        engine = state.requests.engine_of.get(request_id)
        if engine and state.registry.speaks_ours(engine):  # None: ended; UNROUTED: no engine
            self._send_quietly(engine, encode([int(Headers.ABORT), request_id]))
        if code is None:
            self.free(request_id)
        else:
            self.fail(request_id, code, text, log)
