"""Round robin: the engines in turn, O(1) per request and no accounting."""

from __future__ import annotations

from typing import Any

from .base import Identity, RoutingPolicy


class RoundRobin(RoutingPolicy):
    """Cycle over the engines in their order (arrival order, or dp-rank order when deterministic)."""

    def choose(self, request: Any = None) -> Identity:
        engines = self.engines
        if not engines:
            raise LookupError("no engine is registered")
        index = self._next
        if index >= len(engines):
            index = 0
        self._next = index + 1
        return engines[index]
