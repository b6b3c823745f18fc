"""Bounds on the coordinator's outstanding work and per-request deadlines.

The coordinator never queues without bound: past ``max_outstanding`` requests in flight in
total, or ``max_outstanding_per_engine`` on every engine, a new request is refused at once with
an ``overloaded`` ERROR (the client may retry later), so the coordinator's memory is bounded by
these numbers times the largest message, whatever the offered load.

``request_timeout`` (seconds, optional) gives each request a deadline; past it the client gets a
``timeout`` ERROR and the engine holding the request is told to ABORT it. Deadlines live in a
heap keyed by time; finished requests are skipped lazily and the heap is compacted when stale
entries dominate, so it stays proportional to the requests in flight.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

DEFAULT_MAX_OUTSTANDING = 65536
DEFAULT_MAX_OUTSTANDING_PER_ENGINE = 16384


@dataclass(frozen=True)
class Limits:
    """Validated limit options of one coordinator."""

    max_outstanding: int = DEFAULT_MAX_OUTSTANDING
    max_outstanding_per_engine: int = DEFAULT_MAX_OUTSTANDING_PER_ENGINE
    request_timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_outstanding", "max_outstanding_per_engine"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        timeout = self.request_timeout
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0
        ):
            raise ValueError(
                f"request_timeout must be a positive number of seconds, got {timeout!r}"
            )


class DeadlineQueue:
    """Request deadlines in time order; ``expired(now, alive)`` pops those that passed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []

    def add(self, deadline: float, request_id: int) -> None:
        heapq.heappush(self._heap, (deadline, request_id))

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def expired(self, now: float, alive: dict[int, object]) -> list[int]:
        """Request ids whose deadline passed and that are still in ``alive`` (in flight)."""
        heap = self._heap
        out: list[int] = []
        while heap and heap[0][0] <= now:
            _, request_id = heapq.heappop(heap)
            if request_id in alive:
                out.append(request_id)
        return out

    def compact(self, alive: dict[int, object]) -> None:
        """Drop entries of finished requests once they outnumber the live ones."""
        heap = self._heap
        if len(heap) > 2 * len(alive) + 1024:
            self._heap = [entry for entry in heap if entry[1] in alive]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)
