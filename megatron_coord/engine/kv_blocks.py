"""The paged KV cache's bookkeeping: which block holds what, who uses it, what may go.

The KV pool is ``num_blocks`` blocks of ``block_size`` positions (the model's tensors; this
module never touches them). A request owns a *block table*: the blocks of its positions in
order. With prefix caching, every full block that has been computed is named by its chain hash
(prefix_hash.py) and stays in the pool after its request left, so a later request whose prompt
starts with the same tokens takes those blocks by reference (a refcount) and prefills only the
rest. A block nobody uses is evictable, least recently used first; a block in use never is.

Blocks are reserved at admission for a request's whole footprint (prompt + token budget,
capped at the sequence limit), so a running request never runs out of KV memory: a request
that cannot get its blocks waits in the queue until others leave (the engine refuses up front
one that would need more than the whole pool).

Names are salted with the weights' version (``salt``: prefix_hash.version_salt): the pool keys
a block by ``name ^ salt`` and caches only blocks computed under its current salt. A new
version (``reset_cache``) forgets every cached block: those no request holds become free, those
running requests hold stay theirs, unnamed (freed, not cached, when they leave). Reports name
blocks by their version-free names, which is what the coordinator computes.

Everything here is deterministic, so every rank of a TP group takes the same decisions from the
same inputs. Only the TP-coordinator records block events (``record_events``): the stored and
evicted hashes since the last report, which the coordinator uses to index each replica's cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

DEFAULT_BLOCK_SIZE = 16


class BlockPool:
    """Refcounted KV blocks with an LRU-evicted prefix cache keyed by chain hash."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # unnamed and unused; pop() -> 0 first
        self.salt = 0  # of the weights the cached blocks were computed under
        self._hash_of: dict[int, int] = {}  # block -> its key, name ^ salt (cached blocks only)
        self._block_of: dict[int, int] = {}  # key -> block
        self._lru: OrderedDict[int, None] = OrderedDict()  # named, unused: oldest first
        # Cumulative prompt tokens looked up / found (the hit rate), over admitted requests.
        self.queried_tokens = 0
        self.hit_tokens = 0
        # Block events since the last drain: name -> True (stored) / False (evicted). Bounded:
        # past the bound they are dropped for a full snapshot (``reset``) at the next drain.
        self.record_events = False
        self._events: dict[int, bool] = {}
        self._reset = False
        self._max_events = 4 * num_blocks + 1024

    # ------------------------------------------------------------------ sizes
    def blocks_for(self, tokens: int) -> int:
        """Blocks a table needs to hold ``tokens`` positions."""
        return math.ceil(tokens / self.block_size)

    @property
    def available(self) -> int:
        """Blocks a new request could get: free ones plus evictable cached ones."""
        return len(self._free) + len(self._lru)

    @property
    def cached(self) -> int:
        """Blocks holding a named (reusable) prefix, in use or not."""
        return len(self._hash_of)

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.available

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The blocks of the longest cached chain that ``hashes`` starts with."""
        blocks = []
        salt = self.salt
        for h in hashes:
            block = self._block_of.get(h ^ salt)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # ------------------------------------------------------------------ allocation
    def allocate(
        self, hashes: Sequence[int], prompt_len: int, footprint: int
    ) -> tuple[list[int], int] | None:
        """A block table for ``footprint`` positions, reusing cached prompt blocks.

        ``hashes`` are the prompt's full-block names (empty: no reuse). At most
        ``(prompt_len - 1) // block_size`` blocks are reused, so the last prompt token is always
        computed (its logits give the first token). Returns (table, reused blocks), or None when
        the pool cannot supply the rest now: nothing is changed then.
        """
        reuse = []
        if self.caching and hashes:
            reuse = self.lookup(hashes[: (prompt_len - 1) // self.block_size])
        needed = self.blocks_for(footprint) - len(reuse)
        reclaimed = sum(1 for block in reuse if self._refs[block] == 0)  # leave the LRU
        if needed > self.available - reclaimed:
            return None
        for block in reuse:
            if self._refs[block] == 0:
                del self._lru[block]
            self._refs[block] += 1
        table = reuse + [self._take() for _ in range(needed)]
        self.queried_tokens += prompt_len
        self.hit_tokens += len(reuse) * self.block_size
        return table, len(reuse)

    def _take(self) -> int:
        """A block for exclusive use: a free one, else the least recently used cached one."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._lru.popitem(last=False)
            key = self._hash_of.pop(block)
            del self._block_of[key]
            self._event(key ^ self.salt, False)
        self._refs[block] = 1
        return block

    def free(self, table: Sequence[int]) -> None:
        """A request leaves: drop its references. Its named blocks stay cached (evictable),
        tail first in LRU order, so a chain is evicted from its end."""
        for block in reversed(table):
            refs = self._refs[block] - 1
            if refs < 0:
                raise RuntimeError(f"KV block {block} freed more often than taken")
            self._refs[block] = refs
            if refs == 0:
                if block in self._hash_of:
                    self._lru[block] = None
                else:
                    self._free.append(block)

    def register(self, block: int, name: int, salt: int | None = None) -> bool:
        """Name a full, computed block so later prompts can reuse it. False if that name is
        cached already (another block computed the same prefix: this one stays private), or
        if the block was computed under other weights (``salt``, default the current one)."""
        key = name ^ self.salt
        if salt is not None and salt != self.salt:
            return False
        if not self.caching or key in self._block_of or block in self._hash_of:
            return False
        self._hash_of[block] = key
        self._block_of[key] = block
        self._event(name, True)
        return True

    def reset_cache(self, salt: int) -> None:
        """Forget every cached block (new weights, or lost KV contents); from now on blocks
        are named under ``salt``. Blocks in use stay with their requests, unnamed; the next
        report says ``kv_blocks_reset``."""
        for block in self._lru:
            self._free.append(block)
        self._lru.clear()
        self._hash_of.clear()
        self._block_of.clear()
        self.salt = salt
        self.request_snapshot()

    # ------------------------------------------------------------------ reports
    def _event(self, name: int, stored: bool) -> None:
        if not self.record_events:
            return
        self._events[name] = stored
        if len(self._events) > self._max_events:
            self.request_snapshot()

    def request_snapshot(self) -> None:
        """The next drain reports every cached name with ``reset`` (after a (re-)registration,
        or when events overflowed): the coordinator then replaces what it knew."""
        self._events.clear()
        self._reset = True

    def drain_events(self) -> dict[str, Any]:
        """Report fields for the block events since the last drain (none: an empty dict)."""
        if self._reset:
            self._reset = False
            self._events.clear()
            salt = self.salt
            return {"kv_blocks_reset": True, "kv_blocks_stored": [k ^ salt for k in self._block_of]}
        if not self._events:
            return {}
        events, self._events = self._events, {}
        report: dict[str, Any] = {}
        stored = [name for name, kept in events.items() if kept]
        evicted = [name for name, kept in events.items() if not kept]
        if stored:
            report["kv_blocks_stored"] = stored
        if evicted:
            report["kv_blocks_evicted"] = evicted
        return report

    def stats(self) -> dict[str, Any]:
        """Cache size and hit rate, for load reports."""
        queried = self.queried_tokens
        return {
            "prefix_caching": self.caching,
            "kv_block_size": self.block_size,
            "kv_blocks": self.num_blocks,
            "kv_blocks_free": self.available,
            "kv_blocks_cached": self.cached,
            "prefix_cache_queried_tokens": queried,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_hit_rate": round(self.hit_tokens / queried, 4) if queried else 0.0,
        }
