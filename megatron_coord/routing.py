"""Which engine gets the next request: a small policy interface and its round-robin policy.

The coordinator asks its policy for an engine once per request (``choose``), tells it when a
request starts and ends on an engine (``on_submit``/``on_finish``, only when the policy says it
``tracks_load``) and when engines come and go. A least-loaded policy can be added later without
touching the coordinator's hot path. No torch here: the coordinator process must start fast.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

Identity = bytes


class RoutingPolicy:
    """Base class of routing policies. Engines are ZMQ identities (bytes)."""

    # The coordinator calls on_submit/on_finish only for policies that need them, so the
    # round-robin hot path pays for nothing it does not use.
    tracks_load = False

    def __init__(self, engines: Iterable[Identity] = ()) -> None:
        self.engines: list[Identity] = []
        for engine in engines:
            self.add_engine(engine)

    def add_engine(self, engine: Identity) -> None:
        """Make ``engine`` eligible for new requests (appended to the routing order)."""
        if engine in self.engines:
            raise ValueError(f"engine {engine!r} is already routed to")
        self.engines.append(engine)

    def remove_engine(self, engine: Identity) -> None:
        """Stop routing new requests to ``engine`` (requests it holds are not moved)."""
        self.engines.remove(engine)

    def choose(self, request: Any = None) -> Identity:
        """The engine that should receive ``request``."""
        raise NotImplementedError

    def on_submit(self, engine: Identity, request_id: int) -> None:
        """``request_id`` was sent to ``engine``."""

    def on_finish(self, engine: Identity, request_id: int) -> None:
        """``request_id`` left ``engine`` (finished, failed or aborted)."""


class RoundRobin(RoutingPolicy):
    """Cycle over the engines in their order (arrival order, or dp-rank order when deterministic)."""

    def __init__(self, engines: Iterable[Identity] = ()) -> None:
        self._next = 0
        super().__init__(engines)

    def remove_engine(self, engine: Identity) -> None:
        index = self.engines.index(engine)
        super().remove_engine(engine)
        if index < self._next:
            self._next -= 1
        if self._next >= len(self.engines):
            self._next = 0

    def choose(self, request: Any = None) -> Identity:
        engines = self.engines
        if not engines:
            raise LookupError("no engine is registered")
        index = self._next
        if index >= len(engines):
            index = 0
        self._next = index + 1
        return engines[index]


POLICIES: dict[str, Callable[[Iterable[Identity]], RoutingPolicy]] = {"round_robin": RoundRobin}


def make_policy(name: str, engines: deque[Identity] | Iterable[Identity]) -> RoutingPolicy:
    """Build the policy registered under ``name`` over ``engines`` (in routing order)."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}")
    return factory(engines)
