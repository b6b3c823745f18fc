"""Prefix aware: least loaded with affinity to the replica caching a prompt's prefix."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..prefix_index import DEFAULT_INDEX_BLOCKS, BlockNamer, PrefixIndex
from .base import Identity
from .least_loaded import LeastLoaded

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

    def on_version_change(self, engine: Identity) -> None:
        """New weights on ``engine``: its blocks are forgotten, also those of its requests in
        flight (kept ones hold blocks of the old weights; the engine names recomputed ones
        again in its reports), so no request is routed on blocks of other weights."""
        bit = self._bit.get(engine)
        if bit is None:
            return
        self.index.drop(bit)
        for request_id in [r for r, (held, _) in self._in_flight.items() if held == engine]:
            del self._in_flight[request_id]

    def holds(self, engine: Identity) -> int:
        """How many indexed blocks ``engine`` holds (tests, debugging; O(index))."""
        bit = self._bit.get(engine, 0)
        return sum(
            1 for table in (self.index.young, self.index.old) for m in table.values() if m & bit
        )


def _block_names(names: list[Any]) -> list[int]:
    """The valid names of a report's list (64-bit non-negative ints)."""
    return [n for n in names if type(n) is int and 0 <= n < 1 << 64]
