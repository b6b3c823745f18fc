"""Which engine gets the next request: a small policy interface, round robin and least loaded.

The coordinator asks its policy for an engine once per request (``choose``) and, only when the
policy says it ``tracks_load``, tells it what it learns about the work each engine holds:
a request was sent (``on_submit``, with its prompt and token budget), its text prompt was
tokenized (``on_prompt_tokens``), tokens were streamed (``on_tokens``), it ended
(``on_finish``), an engine sent a HEARTBEAT load report (``on_load_report``). Round robin pays
for none of this on the hot path. No torch here: the coordinator process must start fast.
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

    def on_resubmit(self, old: Identity, new: Identity, request_id: int) -> None:
        """``request_id`` moved from ``old`` (dead) to ``new``, where it starts over."""
        self.on_finish(old, request_id)
        self.on_submit(new, request_id)


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
        super().__init__(engines)

    # ------------------------------------------------------------------ engines

    def add_engine(self, engine: Identity) -> None:
        super().add_engine(engine)
        self._load[engine] = 0
        self._seen[engine] = 0
        self._reported[engine] = 0
        self._base[engine] = None

    def remove_engine(self, engine: Identity) -> None:
        super().remove_engine(engine)
        for table in (self._load, self._seen, self._reported, self._base):
            del table[engine]

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
        """The least-loaded engine; scanning starts after the last pick, so ties rotate.

        O(engines) with the load computed inline: this runs once per request."""
        engines = self.engines
        count = len(engines)
        if not count:
            raise LookupError("no engine is registered")
        own, reported, seen = self._load, self._reported, self._seen
        index = self._next if self._next < count else 0
        best_index, best = index, None
        for _ in range(count):
            engine = engines[index]
            load = own[engine]
            unseen = reported[engine] - seen[engine]
            if unseen > 0:
                load -= unseen
            if best is None or load < best:
                best, best_index = load, index
                if load <= 0:
                    break  # idle: nothing can beat it
            index += 1
            if index == count:
                index = 0
        self._next = best_index + 1
        return engines[best_index]

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

    def on_resubmit(self, old: Identity, new: Identity, request_id: int) -> None:
        """The request keeps its size and starts over on ``new`` (nothing of it was seen)."""
        tracked = self._requests.get(request_id)
        if tracked is None:
            return  # deterministic mode: the cumulative routed work stays where it was routed
        if tracked.engine in self._load:
            self._load[tracked.engine] -= tracked.remaining
        tracked.engine, tracked.generated, tracked.prefilled = new, 0, False
        if new in self._load:
            self._load[new] += tracked.remaining

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


POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
}


def make_policy(
    name: str,
    engines: deque[Identity] | Iterable[Identity],
    deterministic: bool = False,
) -> RoutingPolicy:
    """Build the policy registered under ``name`` over ``engines`` (in routing order).

    ``deterministic``: the routing must be a pure function of the request sequence (the
    coordinator's ``deterministic_mode``); round robin always is."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}")
    if factory is LeastLoaded:
        return LeastLoaded(engines, deterministic=deterministic)
    return factory(engines)
