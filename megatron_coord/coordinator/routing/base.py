"""The routing policy interface: which engine gets the next request, and what a policy is told.

The coordinator asks its policy for an engine once per request (``choose``) and, only when the
policy says it ``tracks_load``, tells it what it learns about the work each engine holds:
a request was sent (``on_submit``, with its prompt and token budget), its text prompt was
tokenized (``on_prompt_tokens``), tokens were streamed (``on_tokens``), it ended
(``on_finish``), an engine sent a HEARTBEAT load report (``on_load_report``). Round robin pays
for none of this on the hot path. No torch here: the coordinator process must start fast.

Membership tests on ``engines`` are O(1) (``EngineList``). Adding or removing an engine may
cost O(n): it happens per registration or health change, never per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Identity = bytes


class EngineList(list):
    """The routable engines in routing order, with O(1) ``in`` (health checks ask per
    HEARTBEAT). Only ``append`` and ``del engines[index]`` change it."""

    def __init__(self) -> None:
        super().__init__()
        self._members: set[Identity] = set()

    def __contains__(self, engine: object) -> bool:
        return engine in self._members

    def append(self, engine: Identity) -> None:
        super().append(engine)
        self._members.add(engine)

    def __delitem__(self, index: int) -> None:  # type: ignore[override]
        self._members.discard(self[index])
        super().__delitem__(index)


class RoutingPolicy:
    """Base class of routing policies. Engines are ZMQ identities (bytes)."""

    # The coordinator calls on_submit/on_finish only for policies that need them, so the
    # round-robin hot path pays for nothing it does not use.
    tracks_load = False
    # True: ``choose`` wants the prompt's token ids, so the coordinator routes the requests
    # of a wake-up after tokenizing them (client_handlers.flush), not as they arrive.
    needs_tokens = False

    def __init__(self, engines: Iterable[Identity] = ()) -> None:
        self.engines: EngineList = EngineList()
        self._next = 0  # where a rotating choice starts (an index into engines; may be past it)
        for engine in engines:
            self.add_engine(engine)

    def add_engine(self, engine: Identity) -> None:
        """Make ``engine`` eligible for new requests (appended to the routing order)."""
        if engine in self.engines:
            raise ValueError(f"engine {engine!r} is already routed to")
        self.engines.append(engine)

    def remove_engine(self, engine: Identity) -> None:
        """Stop routing new requests to ``engine`` (requests it holds are not moved); the
        rotation goes on with the engine after it."""
        index = self.engines.index(engine)
        del self.engines[index]
        if index < self._next:
            self._next -= 1

    def choose(self, request: Any = None) -> Identity:
        """The engine that should receive ``request``."""
        raise NotImplementedError

    def on_submit(
        self,
        engine: Identity,
        request_id: int,
        prompt: str | list[int] | None = None,
        max_new_tokens: int = 0,
    ) -> None:
        """``request_id`` was sent to ``engine`` (``max_new_tokens``: its generation budget)."""

    def on_prompt_tokens(self, request_id: int, prompt_tokens: int) -> None:
        """The text prompt of ``request_id`` tokenized to ``prompt_tokens`` tokens."""

    def on_tokens(self, engine: Identity, request_id: int, count: int) -> None:
        """``engine`` streamed ``count`` newly generated tokens of ``request_id``."""

    def on_finish(self, engine: Identity, request_id: int, generated: int | None = None) -> None:
        """``request_id`` left ``engine`` (finished, failed or aborted).

        ``generated``: how many tokens its final record carries (None: it failed, no record)."""

    def on_load_report(self, engine: Identity, report: dict[str, Any]) -> None:
        """``engine`` sent a HEARTBEAT load report."""

    def on_version_change(self, engine: Identity) -> None:
        """``engine`` serves other weights now: what it cached before is of no use."""

    def on_resubmit(self, old: Identity, new: Identity, request_id: int) -> None:
        """``request_id`` moved from ``old`` (dead) to ``new``, where it starts over."""
        self.on_finish(old, request_id)
        self.on_submit(new, request_id)
