"""Which engine gets the next request: a small policy interface, round robin, least loaded and
prefix aware (least loaded with affinity to the replica caching a prompt's prefix).

The coordinator asks its policy for an engine once per request (``choose``) and, only when the
policy says it ``tracks_load``, tells it what it learns about the work each engine holds:
a request was sent (``on_submit``, with its prompt and token budget), its text prompt was
tokenized (``on_prompt_tokens``), tokens were streamed (``on_tokens``), it ended
(``on_finish``), an engine sent a HEARTBEAT load report (``on_load_report``). Round robin pays
for none of this on the hot path. No torch here: the coordinator process must start fast.

Cost per request is independent of the number of engines: round robin is O(1), least loaded
keeps the engines' loads in a min-tree (``_MinTree``) and chooses and updates in O(log n);
membership tests on ``engines`` are O(1) (``EngineList``). Adding or removing an engine may
cost O(n): it happens per registration or health change, never per request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .prefix_index import DEFAULT_INDEX_BLOCKS, BlockNamer, PrefixIndex

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


_EMPTY = float("inf")  # the key of a slot that holds no engine


class _MinTree:
    """A binary min-tree over slots: set a slot's key and find the first slot at or after a
    position holding the minimum, both in O(log n). Least loaded's choice with round-robin ties
    is exactly that query, so it needs no scan over the engines."""

    __slots__ = ("size", "tree")

    def __init__(self, capacity: int) -> None:
        size = 4
        while size < capacity:
            size <<= 1
        self.size = size
        self.tree: list[float] = [_EMPTY] * (2 * size)

    def set(self, slot: int, key: float) -> None:
        tree = self.tree
        i = slot + self.size
        tree[i] = key
        i >>= 1
        while i:
            left, right = tree[2 * i], tree[2 * i + 1]
            smaller = left if left <= right else right
            if tree[i] == smaller:
                return  # nothing above changes
            tree[i] = smaller
            i >>= 1

    def first_min(self, start: int) -> int:
        """The first slot >= ``start`` holding the minimum key, else the first slot holding it
        (a rotation that wraps). The tree must hold at least one engine."""
        tree, size = self.tree, self.size
        smallest = tree[1]
        i = start + size
        if start < size:
            while tree[i] != smallest:
                while i & 1:  # a right child: climb to the first ancestor with a right sibling
                    i >>= 1
                if not i:
                    break
                i += 1
        if start >= size or not i:
            i = 1
        while i < size:
            i = 2 * i if tree[2 * i] == smallest else 2 * i + 1
        return i - size


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

    Each engine owns a slot of a ``_MinTree`` (slots in routing order; the slots of removed
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
        self._tree = _MinTree(4)
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
        self._tree.set(slot, _EMPTY)
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
        self._tree = _MinTree(max(capacity, 2 * len(live)))
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


DEFAULT_PREFIX_LOAD_FACTOR = 1.5
# Tokens per block of engines that do not say (Megatron-core's): its block_size_tokens default.
# Matching finer than the engine caches would claim prefixes it cannot reuse.
DEFAULT_PREFIX_BLOCK_SIZE = 256
_NO_BLOCKS = 1 << 62  # the "smallest block size" with no engine indexed


class PrefixAware(LeastLoaded):
    """Send a request to the engine holding the longest cached prefix of its prompt, unless
    that engine is too loaded; else (no prefix known anywhere) the least-loaded engine.

    The longest prefix: the prompt's full blocks are named as the engines name them
    (``prefix_hash.block_hashes`` with each engine's block size) and looked up in a
    ``PrefixIndex``, from the first block on, keeping the engines that hold every block so far.
    Among those, the least loaded one is taken unless, counting the request's prompt on both
    sides, its load exceeds ``load_factor`` times the least-loaded engine's: then load wins.
    Counting the request keeps an idle engine from breaking every affinity (0 x factor = 0).
    The default 1.5 keeps the busiest of two replicas within 1.2x their mean load at each
    choice (4 replicas: 1.33x) while letting a conversation stay where its history is cached;
    a cache hit saves the whole prefill of the matched prefix, mostly the larger part of a
    multi-turn request's work. Load accounting is ``LeastLoaded``'s (this is a subclass).

    What the index knows of each engine (``engine_info``: its REGISTER fields):

    * exact: engines of ours with ``prefix_caching`` true and their ``kv_block_size``: the
      blocks they report stored / evicted in their HEARTBEATs (``kv_blocks_reset``: the list
      is the whole cache, what was known is replaced);
    * approximate: engines that report nothing (Megatron-core's, older engines of ours): the
      coordinator's own decisions, blocks of ``block_size`` tokens, aged out of the index,
      named by the coordinator's cheap chain (no blake2b: no engine sends those names);
    * nothing: engines that say ``prefix_caching`` false (no cache: only load matters).

    Every decision is recorded at once for exact engines too: an engine reports its blocks at
    its next heartbeat, and a conversation's next turn often comes sooner; an eviction or a
    snapshot corrects it. An engine removed (dead, unhealthy) loses its entries; one that
    registers again starts empty (and ours send a snapshot).

    ``deterministic=True``: engine reports are ignored (``LeastLoaded``'s cumulative routed
    work, and the index from the coordinator's own decisions only), so the choice is a pure
    function of the request sequence. Requests without tokens (``choose()`` from fail-over)
    go to the least loaded.
    """

    needs_tokens = True

    def __init__(
        self,
        engines: Iterable[Identity] = (),
        deterministic: bool = False,
        load_factor: float = DEFAULT_PREFIX_LOAD_FACTOR,
        index_blocks: int = DEFAULT_INDEX_BLOCKS,
        block_size: int = DEFAULT_PREFIX_BLOCK_SIZE,
        engine_info: Callable[[Identity], dict | None] | None = None,
    ) -> None:
        if not (isinstance(load_factor, int | float) and load_factor >= 1):
            raise ValueError(f"prefix_load_factor must be a number >= 1, got {load_factor!r}")
        if type(block_size) is not int or block_size < 1:
            raise ValueError(f"prefix_block_size must be an integer >= 1, got {block_size!r}")
        self.load_factor = float(load_factor)
        self.block_size = block_size
        self.index = PrefixIndex(index_blocks)
        self.namer = BlockNamer()
        self._engine_info = engine_info or (lambda engine: None)
        self._bit: dict[Identity, int] = {}  # indexed engine -> its bit in the masks
        self._engine_of_bit: dict[int, Identity] = {}
        # Indexed engine -> how its blocks are named: its block size (> 0: the engine's names)
        # or minus it (< 0: the coordinator's own cheaper names, for engines not reporting).
        self._scheme_of: dict[Identity, int] = {}
        self._group: dict[int, int] = {}  # naming scheme -> mask of the engines using it
        self._shortest = _NO_BLOCKS  # the smallest block size in _group
        self._exact: set[Identity] = set()  # engines whose reports the index follows
        # Requests on exact engines not ended yet -> (engine, their prompt's names).
        self._in_flight: dict[int, tuple[Identity, list[int]]] = {}
        # The last prompt looked up: its names, matched depth and holders per block size.
        self._named: tuple[list[int] | None, dict[int, tuple[list[int], int, int]]] = (None, {})
        super().__init__(engines, deterministic)

    # ------------------------------------------------------------------ engines

    def add_engine(self, engine: Identity) -> None:
        super().add_engine(engine)
        info = self._engine_info(engine) or {}
        if info.get("prefix_caching") is False:
            return  # no cache: nothing to index
        size = info.get("kv_block_size")
        exact = type(size) is int and size >= 1 and info.get("prefix_caching") is True
        if not exact:
            size = self.block_size
        used = sum(self._engine_of_bit)
        bit = ~used & (used + 1)  # the lowest free bit: masks stay small ints
        self._bit[engine] = bit
        self._engine_of_bit[bit] = engine
        exact = exact and not self.deterministic  # deterministic: own decisions only
        scheme = size if exact else -size
        self._scheme_of[engine] = scheme
        self._group[scheme] = self._group.get(scheme, 0) | bit
        self._shortest = min(abs(scheme) for scheme in self._group)
        if exact:
            self._exact.add(engine)

    def remove_engine(self, engine: Identity) -> None:
        super().remove_engine(engine)
        bit = self._bit.pop(engine, None)
        if bit is None:
            return
        self.index.drop(bit)
        del self._engine_of_bit[bit]
        scheme = self._scheme_of.pop(engine)
        group = self._group[scheme] & ~bit
        if group:
            self._group[scheme] = group
        else:
            del self._group[scheme]
        self._shortest = min((abs(scheme) for scheme in self._group), default=_NO_BLOCKS)
        self._exact.discard(engine)

    # ------------------------------------------------------------------ choice

    def choose(self, request: Any = None) -> Identity:
        """The engine with the longest cached prefix of ``request`` (a token list) unless load
        wins; the least loaded without tokens or without a match."""
        if request.__class__ is list and len(request) >= self._shortest:
            holders = self._longest_prefix(request)
            if holders:
                engine = self._least_loaded_of(holders)
                cost = len(request)
                if self.load(engine) + cost <= self.load_factor * (self._tree.tree[1] + cost):
                    return engine
        return super().choose()

    def _longest_prefix(self, tokens: list[int]) -> int:
        """The mask of engines holding the longest prefix of ``tokens`` (0: none); the names
        are kept for ``on_submit``."""
        named: dict[int, tuple[list[int], int, int]] = {}
        best, best_tokens = 0, 0
        for scheme, group in self._group.items():
            names = self.namer.names(tokens, scheme)
            depth, mask = self._match(names, group)
            named[scheme] = (names, depth, mask)
            matched = depth * abs(scheme)
            if matched > best_tokens:
                best, best_tokens = mask, matched
        self._named = (tokens, named)
        return best

    def _match(self, names: list[int], group: int) -> tuple[int, int]:
        """(blocks matched, the engines of ``group`` holding them all) for a prompt's names.

        A whole prompt held (its first and last names young, with an engine in common) costs
        two lookups: names are stored and promoted a prompt at a time (a prefix with its
        blocks), and a rotation moves every young name at once, so a young last name means
        its prefix is young too. Otherwise the names are walked from the first, those found
        old promoted (used again)."""
        index = self.index
        young = index.young  # PrefixIndex.holders, inlined: this is the hot path
        if len(names) > 1:
            whole = young.get(names[-1], 0) & group
            if whole:
                whole &= young.get(names[0], 0)
                if whole:
                    return len(names), whole
        mask, depth = group, 0
        for name in names:
            held = young.get(name)
            if held is None:
                held = index.old.get(name, 0)
                if held:
                    index.store((name,), 0)  # used again: young (no engine added)
                    young = index.young
            held &= mask
            if not held:
                break
            mask = held
            depth += 1
        return depth, mask

    def _least_loaded_of(self, mask: int) -> Identity:
        """The least-loaded engine of ``mask`` (ties: the lowest bit, a stable order)."""
        best, best_load = None, 0
        while mask:
            bit = mask & -mask
            mask ^= bit
            engine = self._engine_of_bit[bit]
            load = self.load(engine)
            if best is None or load < best_load:
                best, best_load = engine, load
        return best  # type: ignore[return-value]

    # ------------------------------------------------------------------ what engines hold

    def on_submit(
        self,
        engine: Identity,
        request_id: int,
        prompt: str | list[int] | None = None,
        max_new_tokens: int = 0,
    ) -> None:
        """Accounted as by least loaded; the engine will hold the prompt's blocks (those
        ``choose`` found it holding already are young in the index: only the rest is stored)."""
        super().on_submit(engine, request_id, prompt, max_new_tokens)
        bit = self._bit.get(engine)
        if bit is None or prompt.__class__ is not list:
            return
        scheme = self._scheme_of[engine]
        if len(prompt) < abs(scheme):
            return  # no full block
        tokens, named = self._named
        looked_up = named.get(scheme) if tokens is prompt else None
        self._named = (None, {})
        if looked_up is None:
            names, depth = self.namer.names(prompt, scheme), 0
        else:
            names, depth, holders = looked_up
            if not holders & bit:
                depth = 0
        if depth < len(names):
            self.index.store(names[depth:] if depth else names, bit)
        if scheme > 0:  # an exact engine: a snapshot may come before it stores these
            self._in_flight[request_id] = (engine, names)

    def on_finish(self, engine: Identity, request_id: int, generated: int | None = None) -> None:
        self._in_flight.pop(request_id, None)
        super().on_finish(engine, request_id, generated)

    def on_resubmit(self, old: Identity, new: Identity, request_id: int) -> None:
        self._in_flight.pop(request_id, None)  # the new engine starts it without an entry
        super().on_resubmit(old, new, request_id)

    def on_load_report(self, engine: Identity, report: dict[str, Any]) -> None:
        """Least loaded's correction, and for exact engines their stored / evicted blocks."""
        super().on_load_report(engine, report)
        if engine not in self._exact:
            return
        bit = self._bit[engine]
        stored = report.get("kv_blocks_stored")
        if report.get("kv_blocks_reset") is True:
            # The snapshot lacks what requests still running there have not stored yet (a
            # replica's first report often comes after its first requests): keep those.
            self.index.drop(bit)
            for held, names in self._in_flight.values():
                if held == engine:
                    self.index.store(names, bit)
        if stored.__class__ is list:
            self.index.store(_block_names(stored), bit)
        evicted = report.get("kv_blocks_evicted")
        if evicted.__class__ is list:
            self.index.evict(_block_names(evicted), bit)

    def holds(self, engine: Identity) -> int:
        """How many indexed blocks ``engine`` holds (tests, debugging; O(index))."""
        bit = self._bit.get(engine, 0)
        return sum(
            1 for table in (self.index.young, self.index.old) for m in table.values() if m & bit
        )


def _block_names(names: list[Any]) -> list[int]:
    """The valid names of a report's list (64-bit non-negative ints)."""
    return [n for n in names if type(n) is int and 0 <= n < 1 << 64]


POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "prefix_aware": PrefixAware,
}


def make_policy(
    name: str,
    engines: deque[Identity] | Iterable[Identity],
    deterministic: bool = False,
    **prefix_options: Any,
) -> RoutingPolicy:
    """Build the policy registered under ``name`` over ``engines`` (in routing order).

    ``deterministic``: the routing must be a pure function of the request sequence (the
    coordinator's ``deterministic_mode``); round robin always is. ``prefix_options``: the
    keyword options of ``PrefixAware`` (ignored by the other policies)."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}")
    if factory is PrefixAware:
        return PrefixAware(engines, deterministic=deterministic, **prefix_options)
    if factory is LeastLoaded:
        return LeastLoaded(engines, deterministic=deterministic)
    return factory(engines)


def add_prefix_routing_arguments(parser: Any) -> None:
    """The command-line options of ``prefix_aware`` (launch/arguments.py, standalone.py)."""
    parser.add_argument(
        "--prefix-load-factor",
        type=float,
        default=DEFAULT_PREFIX_LOAD_FACTOR,
        help="prefix_aware: the replica caching a prompt's prefix gets it unless its load "
        "exceeds this many times the least-loaded replica's, the request counted on both "
        f"(default {DEFAULT_PREFIX_LOAD_FACTOR:g}; >= 1)",
    )
    parser.add_argument(
        "--prefix-index-blocks",
        type=int,
        default=DEFAULT_INDEX_BLOCKS,
        help="prefix_aware: KV block names the coordinator remembers across all replicas "
        f"(~75 bytes each; default {DEFAULT_INDEX_BLOCKS:,})",
    )
    parser.add_argument(
        "--prefix-block-size",
        type=int,
        default=DEFAULT_PREFIX_BLOCK_SIZE,
        help="prefix_aware: tokens per block for replicas that do not report their KV block "
        f"size (Megatron-core's; default {DEFAULT_PREFIX_BLOCK_SIZE})",
    )


def prefix_routing_options(args: Any) -> dict[str, Any]:
    """Coordinator options from ``add_prefix_routing_arguments``'s parsed values."""
    return {
        "prefix_load_factor": args.prefix_load_factor,
        "prefix_index_blocks": args.prefix_index_blocks,
        "prefix_block_size": args.prefix_block_size,
    }
