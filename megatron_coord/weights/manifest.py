"""The transfer manifest: which full tensors a trainer sends, and how they are cut into buckets.

A trainer sends Hugging Face-named tensors whole, in its own dtype, in *buckets* of at most
``bucket_bytes``: each bucket is one broadcast of raw bytes holding whole rows of one or more
tensors (a tensor larger than a bucket spans several; a row is never split, so a receiver can
slice its shard's rows or columns out of every piece). Each piece starts at a multiple of
``ALIGN`` bytes, so it can be viewed as its dtype in place. Sender and receivers compute the
layout from the same manifest, broadcast first (msgpack), so a receiver can validate every
name, shape and dtype before the first bucket arrives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec
import torch

FORMAT = 1
ALIGN = 16
# Floating dtypes a trainer may send (a served model converts them to its own on copy).
FLOAT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    """One full tensor: its name, shape and dtype (by name; any torch dtype may be listed, a
    receiver refuses those it cannot use)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def rows(self) -> int:
        """Its first dimension (a 0-d tensor is one row of one element)."""
        return self.shape[0] if self.shape else 1

    @property
    def element_size(self) -> int:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}")
        return dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.element_size

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes if math.prod(self.shape) else 0


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, end)`` of tensor ``tensor`` (an index), at byte ``offset`` of its bucket."""

    tensor: int
    start: int
    end: int
    offset: int


@dataclass
class Manifest:
    """The tensors of one transfer and their bucket layout."""

    tensors: list[TensorInfo]
    buckets: list[list[Piece]]

    def bucket_size(self, index: int) -> int:
        """Bytes of bucket ``index`` (its last piece's end)."""
        last = self.buckets[index][-1]
        return last.offset + (last.end - last.start) * self.tensors[last.tensor].row_bytes

    @property
    def max_bucket_bytes(self) -> int:
        return max((self.bucket_size(i) for i in range(len(self.buckets))), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(
            {
                "format": FORMAT,
                "tensors": [[t.name, list(t.shape), t.dtype] for t in self.tensors],
                "buckets": [
                    [[p.tensor, p.start, p.end, p.offset] for p in b] for b in self.buckets
                ],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Inverse of ``encode``; ValueError on anything else."""
        try:
            raw = msgspec.msgpack.decode(data)
            if raw["format"] != FORMAT:
                raise ValueError(f"manifest format {raw['format']!r}, expected {FORMAT}")
            tensors = [
                TensorInfo(str(n), tuple(int(d) for d in s), str(t)) for n, s, t in raw["tensors"]
            ]
            buckets = [[Piece(*(int(v) for v in p)) for p in b] for b in raw["buckets"]]
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed weight-transfer manifest: {exc}") from None
        return cls(tensors, buckets)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def plan_buckets(tensors: list[TensorInfo], bucket_bytes: int) -> Manifest:
    """Cut ``tensors`` (in order) into buckets of at most ``bucket_bytes``, whole rows each."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for index, info in enumerate(tensors):
        row_bytes = info.row_bytes
        if info.nbytes == 0:
            continue
        if row_bytes > bucket_bytes:
            raise ValueError(
                f"bucket_bytes {bucket_bytes} is smaller than one row of tensor {info.name!r} "
                f"({row_bytes} bytes): rows are never split, give buckets of at least that"
            )
        row = 0
        while row < info.rows:
            offset = _aligned(used)
            fits = max(0, bucket_bytes - offset) // row_bytes
            if fits == 0:
                buckets.append(current)
                current, used = [], 0
                continue
            end = min(info.rows, row + fits)
            current.append(Piece(index, row, end, offset))
            used = offset + (end - row) * row_bytes
            row = end
    if current:
        buckets.append(current)
    return Manifest(list(tensors), buckets)
