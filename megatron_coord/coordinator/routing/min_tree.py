"""A binary min-tree over slots: least loaded's choice in O(log n) instead of a scan."""

from __future__ import annotations

EMPTY = float("inf")  # the key of a slot that holds no engine


class MinTree:
    """A binary min-tree over slots: set a slot's key and find the first slot at or after a
    position holding the minimum, both in O(log n). Least loaded's choice with round-robin ties
    is exactly that query, so it needs no scan over the engines."""

    __slots__ = ("size", "tree")

    def __init__(self, capacity: int) -> None:
        size = 4
        while size < capacity:
            size <<= 1
        self.size = size
        self.tree: list[float] = [EMPTY] * (2 * size)

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
