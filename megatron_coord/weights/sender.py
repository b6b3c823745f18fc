"""``WeightSender``: a trainer's end of a weight update over torch.distributed.

    sender = WeightSender()  # hosts a TCPStore on a free loopback port
    outcome = await client.update_weights(
        "v8", sender=sender, named_tensors=hf_model.named_parameters()
    )

or by hand: put ``sender.source_spec()`` in an UPDATE_WEIGHTS spec; once the coordinator
answers WEIGHT_TRANSFER_READY (every replica knows its ranks), call
``sender.send(named_tensors, world_size)``. It joins the transfer group (transfer_group.py) as
rank 0, broadcasts the manifest (names, shapes, dtypes, bucket layout: manifest.py), then the
tensors, whole and in the trainer's dtype, in buckets of at most ``bucket_bytes / 2``. Each
side has two such buffers, so one is packed (or, receiving, copied into the shard) while the
other travels, one broadcast at a time: the sender holds ``bucket_bytes`` more than the
model, each receiving rank as much more than its shard. A bucket that is a run of rows of one
contiguous tensor is sent from the tensor itself.

With several trainer ranks (``trainer_ranks`` T > 1), rank 0 hosts the store and sends every
tensor; ranks 1..T-1 (built with ``rank`` and rank 0's ``store_port``) only join the group,
calling ``send`` with the same arguments (their tensors are not read).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .manifest import Manifest, Piece, TensorInfo, dtype_name, plan_buckets
from .transfer_group import (
    TransferGroup,
    await_label,
    connect_store,
    forget_label,
    resolve_backend,
)

# Two buckets of 8 MiB: fewer, larger broadcasts; against 4 MiB ones the diagnostic of
# benchmarks/_weight_floor.py measured 0.103 s against 0.118 s (medians of 3, 2 cores, gloo).
DEFAULT_BUCKET_BYTES = 16 << 20
DEFAULT_TIMEOUT_S = 300.0


class WeightSender:
    """Sends a trainer's Hugging Face-named tensors to every replica, bucket by bucket."""

    def __init__(
        self,
        store_host: str = "127.0.0.1",
        store_port: int = 0,
        trainer_ranks: int = 1,
        rank: int = 0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0 <= rank < trainer_ranks:
            raise ValueError(f"rank {rank} is not one of the {trainer_ranks} trainer ranks")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.rank = rank
        self.trainer_ranks = trainer_ranks
        self.bucket_bytes = bucket_bytes
        self.backend = resolve_backend(backend)
        self.timeout_s = timeout_s
        self.device = torch.device(device) if device is not None else None
        self.store_host = store_host
        self.store = connect_store(store_host, store_port, timeout_s, is_master=rank == 0)
        self.store_port = self.store.port if rank == 0 else store_port
        self._sent: set[str] = set()  # labels of the transfers done (or tried)
        self.last_stats: dict[str, Any] = {}

    def source_spec(self) -> dict[str, Any]:
        """The SOURCE of an UPDATE_WEIGHTS spec that makes the replicas receive from us."""
        return {
            "kind": "distributed",
            "store_host": self.store_host,
            "store_port": self.store_port,
            "trainer_ranks": self.trainer_ranks,
            "bucket_bytes": self.bucket_bytes,
            "backend": self.backend,
        }

    def send(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        world_size: int,
        version: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Send the tensors to a transfer group of ``world_size`` ranks (WEIGHT_TRANSFER_READY
        says it), for the update labelled ``version``. Give it when known: with None the
        sender takes the next label the replicas announce in the store, which is right
        unless an earlier update reached the replicas but was never sent.
        ``progress(buckets done, buckets)`` is called after each bucket. Returns what was sent
        (``bytes``, ``buckets``, ``max_bucket_bytes``, ``seconds``, ``version``)."""
        started = time.monotonic()
        tensors = [(name, tensor.detach()) for name, tensor in named_tensors]
        manifest = None
        if self.rank == 0:
            infos = [TensorInfo(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in tensors]
            widest = max((i.row_bytes for i in infos if i.nbytes), default=0)
            if 2 * widest > self.bucket_bytes:
                raise ValueError(
                    f"bucket_bytes {self.bucket_bytes} must be at least twice the largest row "
                    f"of a tensor ({widest} bytes): rows are never split, two buckets fly"
                )
            manifest = plan_buckets(infos, self.bucket_bytes // 2)
        label = (
            version if version is not None else await_label(self.store, self._sent, self.timeout_s)
        )
        self._sent.add(label)
        group = TransferGroup(
            self.store, label, self.rank, world_size, self.backend, self.timeout_s, self.device
        )
        try:
            data = group.broadcast_bytes(manifest.encode() if manifest is not None else None)
            if manifest is None:
                manifest = Manifest.decode(data)
            size = manifest.max_bucket_bytes
            buffers = [torch.empty(size, dtype=torch.uint8, device=group.device) for _ in range(2)]
            travelling: Any = None  # one broadcast at a time: gloo is slower with two
            for index, bucket in enumerate(manifest.buckets):
                view = _whole_rows(bucket, tensors, group.device) if self.rank == 0 else None
                if view is None:  # packed while the last bucket travels
                    view = buffers[index % 2][: manifest.bucket_size(index)]
                    if self.rank == 0:
                        _pack(view, bucket, tensors, manifest)
                if travelling is not None:
                    travelling.wait()
                    if progress is not None:
                        progress(index, len(manifest.buckets))
                travelling = group.start_broadcast(view)
            if travelling is not None:
                travelling.wait()
                if progress is not None:
                    progress(len(manifest.buckets), len(manifest.buckets))
        finally:
            group.close()
            if version is None and self.rank == 0:
                forget_label(self.store)  # the next send waits for the next announcement
        self.last_stats = {
            "version": label,
            "bytes": manifest.total_bytes,
            "buckets": len(manifest.buckets),
            "max_bucket_bytes": manifest.max_bucket_bytes,
            "seconds": time.monotonic() - started,
        }
        return self.last_stats

    def close(self) -> None:
        """Stop hosting the store (rank 0): no later update can use this sender."""
        self.store = None


def _whole_rows(
    bucket: list[Piece], tensors: list[tuple[str, torch.Tensor]], device: torch.device
) -> torch.Tensor | None:
    """A bucket that is one piece of a contiguous tensor already where the group sends from:
    its rows' own bytes, sent as they are (no copy into a buffer); else None."""
    if len(bucket) != 1:
        return None
    piece = bucket[0]
    tensor = tensors[piece.tensor][1]
    if tensor.dim() == 0 or not tensor.is_contiguous() or tensor.device != device:
        return None
    return tensor[piece.start : piece.end].view(-1).view(torch.uint8)


def _pack(
    buffer: torch.Tensor,
    bucket: list[Piece],
    tensors: list[tuple[str, torch.Tensor]],
    manifest: Manifest,
) -> None:
    """Copy a bucket's pieces (whole rows of tensors) into ``buffer`` at their offsets."""
    for piece in bucket:
        name, tensor = tensors[piece.tensor]
        info = manifest.tensors[piece.tensor]
        if tuple(tensor.shape) != info.shape:
            raise ValueError(f"tensor {name!r} changed shape during the transfer")
        rows = tensor.reshape(1) if tensor.dim() == 0 else tensor[piece.start : piece.end]
        flat = rows.contiguous().view(-1).view(torch.uint8)
        buffer[piece.offset : piece.offset + flat.numel()].copy_(flat)
