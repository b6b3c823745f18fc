"""Chained hashes of KV-cache blocks: the names engine and coordinator both give a prefix.

A full block of ``block_size`` tokens is named by a 64-bit hash of its tokens *and* of the
hash of the block before it, so equal hashes mean equal whole prefixes, not just equal blocks.
The engine keys its prefix cache by these names and reports them (stored/evicted) in its
heartbeats; the coordinator, which tokenizes prompts itself, computes the same names from the
token ids alone to know which replica holds a prompt's prefix. That only works if the hash is
the same in every process and on every machine: blake2b over little-endian bytes, never
Python's salted ``hash()``. No torch here: the coordinator imports it.

The weights that computed a block are part of its identity too: the engine keys its cache by
``name ^ version_salt(weight version)``, so a block computed under other weights never matches,
while the names it reports (and the coordinator computes) stay these version-free ones (the
engine caches only the current version's blocks, and says ``kv_blocks_reset`` when it changes).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# The "previous hash" of a prompt's first block.
ROOT_HASH = 0


def chain_hash(previous: int, tokens: Sequence[int]) -> int:
    """The name of a block holding ``tokens`` after the block named ``previous``."""
    data = previous.to_bytes(8, "little") + struct.pack(f"<{len(tokens)}q", *tokens)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_hashes(tokens: Sequence[int], block_size: int, previous: int = ROOT_HASH) -> list[int]:
    """Names of the full blocks of ``tokens`` (a trailing partial block has none), in order.

    ``previous`` continues a chain: the hashes of ``a + b`` are those of ``a`` followed by
    ``block_hashes(b, block_size, previous=hashes_of_a[-1])`` when ``len(a)`` is a multiple
    of ``block_size``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    full = len(tokens) // block_size * block_size
    packed = struct.pack(f"<{full}q", *tokens[:full])
    step = 8 * block_size
    out = []
    blake2b = hashlib.blake2b
    for start in range(0, len(packed), step):
        data = previous.to_bytes(8, "little") + packed[start : start + step]
        previous = int.from_bytes(blake2b(data, digest_size=8).digest(), "little")
        out.append(previous)
    return out


def version_salt(version: str) -> int:
    """A 64-bit salt for the KV blocks computed under the weights labelled ``version``."""
    digest = hashlib.blake2b(version.encode(), digest_size=8, person=b"kv-weights").digest()
    return int.from_bytes(digest, "little")
