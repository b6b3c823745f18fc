"""Which KV blocks each replica holds, as far as the coordinator knows: the prefix index.

Blocks are named as the engine names them (``prefix_hash.block_hashes``: a chained 64-bit
blake2b, so one name stands for a whole prefix); for engines that report nothing, whose names
the coordinator only ever computes itself, by a cheaper chain of its own (``BlockNamer``). The
index maps a name to a bitmask of the engines holding it; ``prefix_aware`` routing (routing/prefix_aware.py) walks a prompt's names from the first
block and intersects the masks to find the engines with the longest cached prefix.

Memory is bounded by ``capacity`` names. An exact LRU needs a linked list per entry (an
OrderedDict costs ~2x a dict); instead the index keeps two generations of plain dicts: names
touched (looked up for a routed request, stored) go to ``young``; when ``young`` holds half the
capacity it becomes ``old`` and the previous ``old`` is dropped. A name touched within the last
``capacity / 2`` touches is always kept, and the index never holds more than ``capacity``
names. With at most 8 engines a mask is a small int Python shares, so an entry costs the dict
slot and its 64-bit key: 74 MiB (tracemalloc; peak 79 MiB) for 1,000,000 names, checked
under 100 MiB in tests/test_prefix_routing.py.

Hashing a block with blake2b costs ~1 us. Prompts repeat their prefixes (that is the point), so
``BlockNamer`` remembers the names of prefixes it has seen, keyed by a cheap chained Python
hash of the tokens (a tuple hash: deterministic across processes, not salted): a prefix seen
before costs a tuple hash per block, and blake2b runs only for blocks new to the coordinator;
a whole prompt seen again (the same prompt sampled n times, an RL rollout group) costs one.
A collision of the cheap hash could only misroute a request (the engine still checks its own
names), never change an output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..prefix_hash import ROOT_HASH, chain_hash

DEFAULT_INDEX_BLOCKS = 1_000_000
DEFAULT_NAMER_BLOCKS = 1 << 17
_NAMER_PROMPTS = 4096


class PrefixIndex:
    """Block name -> bitmask of the engines holding it, at most ``capacity`` names."""

    __slots__ = ("capacity", "_half", "young", "old")

    def __init__(self, capacity: int = DEFAULT_INDEX_BLOCKS) -> None:
        if type(capacity) is not int or capacity < 2:
            raise ValueError(f"prefix_index_blocks must be an integer >= 2, got {capacity!r}")
        self.capacity = capacity
        self._half = capacity // 2
        self.young: dict[int, int] = {}
        self.old: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.young) + len(self.old)

    def holders(self, name: int) -> int:
        """The mask of engines holding ``name`` (0: none known)."""
        mask = self.young.get(name)
        if mask is None:
            return self.old.get(name, 0)
        return mask

    def store(self, names: Iterable[int], bit: int) -> None:
        """The engine with mask ``bit`` holds ``names`` (they become the most recent)."""
        young, old, half = self.young, self.old, self._half
        for name in names:
            mask = young.get(name)
            if mask is None:
                mask = old.pop(name, 0)
                if len(young) >= half:
                    self.old = old = young
                    self.young = young = {}
            elif mask & bit:
                continue  # young and held already: nothing changes
            young[name] = mask | bit

    def evict(self, names: Iterable[int], bit: int) -> None:
        """The engine with mask ``bit`` no longer holds ``names``."""
        keep = ~bit
        for table in (self.young, self.old):
            for name in names:
                mask = table.get(name)
                if mask is not None:
                    if mask & keep:
                        table[name] = mask & keep
                    else:
                        del table[name]

    def drop(self, bit: int) -> None:
        """Forget everything the engine with mask ``bit`` held (it died, restarted or sent a
        full snapshot). O(names): once per engine removal, never per request."""
        keep = ~bit
        self.young = {n: m & keep for n, m in self.young.items() if m & keep}
        self.old = {n: m & keep for n, m in self.old.items() if m & keep}


class BlockNamer:
    """Block names of a prompt: the engine's (``prefix_hash.block_hashes``), memoized by
    prefix, or the coordinator's own (for engines that report nothing).

    ``names(tokens, scheme)``: ``scheme`` > 0 is a block size and the names equal
    ``block_hashes(tokens, scheme)``; the memo (at most ``capacity`` prefixes, cleared when
    full) makes a prefix seen before cost one tuple hash per block instead of a blake2b.
    ``scheme`` < 0: blocks of ``-scheme`` tokens named by the tuple-hash chain alone, which is
    all an index of the coordinator's own decisions needs (no engine ever sends these names)."""

    __slots__ = ("capacity", "_memo", "_prompts")

    def __init__(self, capacity: int = DEFAULT_NAMER_BLOCKS) -> None:
        self.capacity = capacity
        self._memo: dict[int, int] = {}
        self._prompts: dict[int, list[int]] = {}  # whole prompts seen again (n samples, RL)

    def names(self, tokens: Sequence[int], scheme: int) -> list[int]:
        """The names (a list the caller must not change) of ``tokens``' full blocks."""
        block_size = scheme if scheme > 0 else -scheme
        full = len(tokens) // block_size * block_size
        if not full:
            return []
        whole = tuple(tokens)  # tuple slices hash without copying into a new tuple
        prompt_key = hash((scheme, whole))
        known = self._prompts.get(prompt_key)
        if known is not None:
            return known
        out: list[int] = []
        key = scheme  # the cheap chain: another block size or scheme names other prefixes
        if scheme < 0:
            for start in range(0, full, block_size):
                key = hash((key, whole[start : start + block_size]))
                out.append(key)
        else:
            memo = self._memo
            if len(memo) >= self.capacity:
                memo.clear()
            get = memo.get
            name = ROOT_HASH
            for start in range(0, full, block_size):
                block = whole[start : start + block_size]
                key = hash((key, block))
                name_of = get(key)
                if name_of is None:
                    name_of = memo[key] = chain_hash(name, block)
                name = name_of
                out.append(name)
        if len(self._prompts) >= _NAMER_PROMPTS:
            self._prompts.clear()
        self._prompts[prompt_key] = out
        return out
