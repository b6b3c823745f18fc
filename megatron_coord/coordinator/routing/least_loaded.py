"""Least loaded: each request to the engine with the least outstanding work, in tokens.

The engines' loads are kept in a min-tree (``MinTree``), so choosing and updating cost
O(log n) per request, independent of the number of engines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import Identity, RoutingPolicy
from .min_tree import EMPTY, MinTree


class _Tracked:
    """The coordinator's view of one outstanding request (least-loaded accounting)."""

    __slots__ = ("engine", "prompt", "budget", "generated", "prefilled", "chars")

    def __init__(self, engine: Identity, prompt: int, budget: int, chars: int) -> None:
        self.engine = engine
        self.prompt = prompt  # prompt tokens (an estimate until on_prompt_tokens for text)
        self.budget = budget  # tokens it may still generate
        self.generated = 0  # tokens seen streamed
        self.prefilled = False  # a streamed token proved the prompt was prefilled
        self.chars = chars  # length of a text prompt not yet tokenized (0: exact)

    @property
    def remaining(self) -> int:
        """Tokens of work still to do as far as the coordinator knows."""
        return (0 if self.prefilled else self.prompt) + max(0, self.budget - self.generated)


class LeastLoaded(RoutingPolicy):
    """Send each request to the engine with the least outstanding work, counted in tokens.

    Outstanding work of an engine = prompt tokens still to prefill + tokens still to generate,
    over the requests the coordinator sent it and has not seen end. The coordinator's own
    accounting adds a request's cost when it is routed (so a burst drained in one wake-up is
    spread: every choice sees the previous ones), takes streamed tokens off as they arrive and
    the rest off when the request ends. Ties go round robin.

    What the coordinator cannot see is progress of requests that do not stream (it learns
    about them only when they end). Engines report, in each HEARTBEAT, the cumulative number
    of tokens they processed (``processed_tokens``: prompt tokens prefilled + tokens
    generated); the coordinator counts the same quantity as far as replies showed it
    (``seen``). Replies and heartbeats travel on the same socket in order, so ``reported -
    seen`` is exactly the work done that no reply has shown yet; it is subtracted from the
    engine's outstanding work. Every later reply raises ``seen`` and so shrinks the correction
    as it takes the same tokens off the outstanding work: nothing is counted twice.

    Text prompts are routed before they are tokenized (the coordinator tokenizes a wake-up's
    prompts in one batch call): their size is estimated from their length in characters with
    the tokens-per-character ratio measured on earlier prompts, and corrected once tokenized.

    ``deterministic=True`` (the coordinator's ``deterministic_mode``) makes the choice a pure
    function of the request sequence: the policy balances the cumulative cost routed to each
    engine (prompt + budget, text prompts at a fixed 4 characters per token) and ignores
    everything timing-dependent (replies, streamed tokens, load reports, tokenization results).

    Each engine owns a slot of a ``MinTree`` (slots in routing order; the slots of removed
    engines are left empty and compacted away once they are half of them) whose key is its
    load, updated whenever its accounting changes: the choice is one tree query, O(log n), and
    equals the linear scan it replaced (the least load, ties to the first engine after the last
    pick).
    """

    tracks_load = True
    DEFAULT_CHARS_PER_TOKEN = 4.0

    def __init__(self, engines: Iterable[Identity] = (), deterministic: bool = False) -> None:
        self.deterministic = deterministic
        self._load: dict[Identity, int] = {}  # own accounting: outstanding tokens
        self._seen: dict[Identity, int] = {}  # processed tokens that replies showed
        self._reported: dict[Identity, int] = {}  # last processed_tokens of a HEARTBEAT - base
        # processed_tokens counts from the engine process's start, which may predate its
        # (re)registration here: its first report sets the baseline (None: no report yet).
        self._base: dict[Identity, int | None] = {}
        self._requests: dict[int, _Tracked] = {}
        self._chars = 0  # calibration of the text-prompt estimate
        self._tokens = 0
        self._slot: dict[Identity, int] = {}  # engine -> its slot in the tree
        self._slots: list[Identity | None] = []  # slot -> engine (None: removed)
        self._tree = MinTree(4)
        self._next_slot = 0  # ties go to the first engine at or after this slot
        super().__init__(engines)

    # ------------------------------------------------------------------ engines

    def add_engine(self, engine: Identity) -> None:
        super().add_engine(engine)
        self._load[engine] = 0
        self._seen[engine] = 0
        self._reported[engine] = 0
        self._base[engine] = None
        if len(self._slots) == self._tree.size:
            self._compact(len(self._slots) + 1)
        self._slot[engine] = len(self._slots)
        self._slots.append(engine)
        self._tree.set(self._slot[engine], 0)

    def remove_engine(self, engine: Identity) -> None:
        super().remove_engine(engine)
        for table in (self._load, self._seen, self._reported, self._base):
            del table[engine]
        slot = self._slot.pop(engine)
        self._slots[slot] = None
        self._tree.set(slot, EMPTY)
        if len(self._slots) > 2 * len(self._slot) + 8:
            self._compact(len(self._slots))

    def _compact(self, capacity: int) -> None:
        """Renumber the slots in routing order (dropping empty ones) into a tree with room for
        ``capacity``; the rotation resumes at the same engine. O(n), amortised over the
        additions and removals that made it necessary."""
        following = [e for e in self._slots[self._next_slot :] if e is not None]
        live = [e for e in self._slots if e is not None]
        self._next_slot = live.index(following[0]) if following else len(live)
        self._slots = live
        self._slot = {engine: slot for slot, engine in enumerate(live)}
        self._tree = MinTree(max(capacity, 2 * len(live)))
        for slot, engine in enumerate(live):
            self._tree.set(slot, self.load(engine))

    def _changed(self, engine: Identity) -> None:
        """``engine``'s accounting changed: its key in the tree follows."""
        self._tree.set(self._slot[engine], self.load(engine))

    def load(self, engine: Identity) -> int:
        """Outstanding work of ``engine`` in tokens: own accounting minus unseen progress."""
        unseen = self._reported[engine] - self._seen[engine]
        load = self._load[engine]
        if unseen > 0:
            load -= unseen
        return load if load > 0 else 0

    def loads(self) -> dict[Identity, int]:
        """Every engine's outstanding work (for STATS and tests)."""
        return {engine: self.load(engine) for engine in self.engines}

    # ------------------------------------------------------------------ choice

    def choose(self, request: Any = None) -> Identity:
        """The least-loaded engine; ties go to the first one after the last pick (they rotate).

        O(log engines): one query of the min-tree."""
        if not self._slot:
            raise LookupError("no engine is registered")
        slot = self._tree.first_min(self._next_slot)
        self._next_slot = slot + 1
        return self._slots[slot]  # type: ignore[return-value]

    def _estimate(self, text: str) -> int:
        if self.deterministic or self._chars == 0:
            ratio = 1.0 / self.DEFAULT_CHARS_PER_TOKEN
        else:
            ratio = self._tokens / self._chars
        return max(1, round(len(text) * ratio))

    # ------------------------------------------------------------------ accounting

    def on_submit(
        self,
        engine: Identity,
        request_id: int,
        prompt: str | list[int] | None = None,
        max_new_tokens: int = 0,
    ) -> None:
        chars = 0
        if isinstance(prompt, str):
            chars = len(prompt)
            prompt_tokens = self._estimate(prompt)
        else:
            prompt_tokens = len(prompt) if prompt is not None else 0
        budget = max(0, max_new_tokens)
        if engine in self._load:
            self._load[engine] += prompt_tokens + budget
            self._changed(engine)
        if not self.deterministic:
            self._requests[request_id] = _Tracked(engine, prompt_tokens, budget, chars)

    def on_prompt_tokens(self, request_id: int, prompt_tokens: int) -> None:
        tracked = self._requests.get(request_id)
        if tracked is None or not tracked.chars:
            return
        self._chars += tracked.chars
        self._tokens += prompt_tokens
        tracked.chars = 0
        if not tracked.prefilled and tracked.engine in self._load:
            self._load[tracked.engine] += prompt_tokens - tracked.prompt
            self._changed(tracked.engine)
        tracked.prompt = prompt_tokens

    def on_tokens(self, engine: Identity, request_id: int, count: int) -> None:
        tracked = self._requests.get(request_id)
        if tracked is None or tracked.engine not in self._load:
            return
        before = tracked.remaining
        seen = count
        if not tracked.prefilled and count > 0:
            tracked.prefilled = True
            seen += tracked.prompt
        tracked.generated += count
        self._load[tracked.engine] -= before - tracked.remaining
        self._seen[tracked.engine] += seen
        self._changed(tracked.engine)

    def on_finish(self, engine: Identity, request_id: int, generated: int | None = None) -> None:
        tracked = self._requests.pop(request_id, None)
        if tracked is None or tracked.engine not in self._load:
            return
        self._load[tracked.engine] -= tracked.remaining
        if generated is not None and generated > tracked.generated:
            seen = generated - tracked.generated
            if not tracked.prefilled:
                seen += tracked.prompt
            self._seen[tracked.engine] += seen
        self._changed(tracked.engine)

    def on_resubmit(self, old: Identity, new: Identity, request_id: int) -> None:
        """The request keeps its size and starts over on ``new`` (nothing of it was seen)."""
        tracked = self._requests.get(request_id)
        if tracked is None:
            return  # deterministic mode: the cumulative routed work stays where it was routed
        if tracked.engine in self._load:
            self._load[tracked.engine] -= tracked.remaining
            self._changed(tracked.engine)
        tracked.engine, tracked.generated, tracked.prefilled = new, 0, False
        if new in self._load:
            self._load[new] += tracked.remaining
            self._changed(new)

    def on_load_report(self, engine: Identity, report: dict[str, Any]) -> None:
        if self.deterministic or engine not in self._reported:
            return
        processed = report.get("processed_tokens")
        if type(processed) is not int or processed < 0:
            return
        base = self._base[engine]
        if base is None or processed < base:  # first report, or the engine restarted
            # Conservative: whatever it processed unseen so far is not corrected for.
            base = self._base[engine] = processed - self._seen[engine]
        self._reported[engine] = processed - base
        self._changed(engine)
