"""The coordinator's request table: every request in flight, from admission to its one outcome.

A request is admitted with a server-side id and leaves the table exactly once (``free``), on
its result, its error, an abort or its client vanishing; every map is keyed by that id, so a
finished request leaves nothing behind (STATS ``maps`` shows the sizes, all 0 when idle).
The maps are plain dicts rather than one record per request: the hot path touches only the
one or two it needs.
"""

from __future__ import annotations

from typing import Any

from .limits import DeadlineQueue

# The "engine" of a request admitted while no engine could take it: it waits in ``orphans``.
# ZMQ identities are never empty, so no engine has this one.
UNROUTED = b""
# The "engine" of a request admitted under a policy that routes by tokens, until the wake-up's
# flush chooses (client_handlers.py). ZMQ reserves identities starting with a zero byte to
# itself, and makes them 5 bytes long: no peer has this one.
ROUTE_LATER = b"\x00route-later"


class Stream:
    """Incremental detokenization of one streaming request (never splits a character)."""

    __slots__ = ("tokens", "prefix_offset", "read_offset")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, detokenize: Any, new_tokens: list[int]) -> str:
        """Append tokens; return the newly completed text (held back while it ends in U+FFFD)."""
        self.tokens.extend(new_tokens)
        prefix = detokenize(self.tokens[self.prefix_offset : self.read_offset])
        text = detokenize(self.tokens[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return text[len(prefix) :]
        return ""


class RequestTable:
    """Ids, owners, engines, streams, resubmittable frames and deadlines of requests in flight.

    ``client_of`` and ``client_request_id_of`` are the seed's ``request_id_to_client_id`` and
    ``request_id_to_client_request_id`` (the coordinator exposes the same dict objects).
    """

    def __init__(self) -> None:
        self.next_request_id = 0
        self.client_of: dict[int, bytes] = {}
        self.client_request_id_of: dict[int, Any] = {}
        self.engine_of: dict[int, bytes] = {}
        self.inflight: dict[tuple[bytes, Any], int] = {}  # (client, client_request_id) -> id
        self.prompt_text: dict[int, str] = {}  # text prompts: the reply's "prompt"
        self.streams: dict[int, Stream] = {}
        self.submitted: dict[int, bytes] = {}  # the SUBMIT frame sent: resent if its engine dies
        self.per_engine: dict[bytes, int] = {}  # engine -> requests outstanding on it
        self.deadlines = DeadlineQueue()
        # Requests that wait for an engine (none was left, or none had registered yet, or
        # their stream can only go on where it started): id -> deadline.
        self.orphans: dict[int, float] = {}
        # Requests whose engine was lost (fail-over), and how many times: a final result may
        # then come from an engine other than the one now holding it (the first one wins).
        self.failovers: dict[int, int] = {}
        # Orphans of an engine that fell silent (it may only have paused): id -> until when
        # they wait for that engine alone (failover.py).
        self.reserved: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.engine_of)

    def add(self, client: bytes, client_request_id: Any, engine: bytes, streaming: bool) -> int:
        """Admit a request routed to ``engine``; returns its server-side id."""
        request_id = self.next_request_id
        self.next_request_id = request_id + 1
        self.client_of[request_id] = client
        self.client_request_id_of[request_id] = client_request_id
        self.engine_of[request_id] = engine
        self.inflight[(client, client_request_id)] = request_id
        self.per_engine[engine] = self.per_engine.get(engine, 0) + 1
        if streaming:
            self.streams[request_id] = Stream()
        return request_id

    def free(self, request_id: int) -> tuple[bytes, Any, bytes] | None:
        """Forget a request everywhere; (client, client_request_id, engine), or None if it
        already ended."""
        client = self.client_of.pop(request_id, None)
        if client is None:
            return None
        client_request_id = self.client_request_id_of.pop(request_id)
        engine = self.engine_of.pop(request_id)
        del self.inflight[(client, client_request_id)]
        self.prompt_text.pop(request_id, None)
        self.streams.pop(request_id, None)
        self.submitted.pop(request_id, None)
        self.orphans.pop(request_id, None)
        self.failovers.pop(request_id, None)
        self.reserved.pop(request_id, None)
        self._count_down(engine)
        return client, client_request_id, engine

    def move(self, request_id: int, dead: bytes, engine: bytes) -> None:
        """``request_id`` left ``dead`` for ``engine`` (fail-over, or adopted back)."""
        self.engine_of[request_id] = engine
        self._count_down(dead)
        self.per_engine[engine] = self.per_engine.get(engine, 0) + 1

    def held_by(self, engine: bytes) -> list[int]:
        return [rid for rid, e in self.engine_of.items() if e == engine]

    def relayed(self, request_id: int) -> int | None:
        """Tokens of a streaming request already relayed to its client (None: not a stream)."""
        stream = self.streams.get(request_id)
        return None if stream is None else len(stream.tokens)

    def of_client(self, client: bytes) -> list[int]:
        return [rid for (c, _), rid in self.inflight.items() if c == client]

    def forget_engine(self, engine: bytes) -> None:
        """Drop a dead engine's count (its requests were moved or ended already)."""
        self.per_engine.pop(engine, None)

    def _count_down(self, engine: bytes) -> None:
        count = self.per_engine.get(engine)
        if count is not None:
            if count > 1:
                self.per_engine[engine] = count - 1
            else:
                del self.per_engine[engine]

    def sizes(self) -> dict[str, int]:
        """Every per-request map's size (the names are STATS ``maps`` keys)."""
        return {
            "request_id_to_client_id": len(self.client_of),
            "request_id_to_client_request_id": len(self.client_request_id_of),
            "request_engine": len(self.engine_of),
            "inflight": len(self.inflight),
            "prompt_text": len(self.prompt_text),
            "streams": len(self.streams),
            "submitted": len(self.submitted),
            "engine_requests": len(self.per_engine),
            "deadlines": len(self.deadlines),
            "orphans": len(self.orphans),
            "failovers": len(self.failovers),
            "reserved": len(self.reserved),
        }
