"""The serving side of a distributed weight update: every rank keeps its shard of each tensor.

Each rank of each replica joins the transfer group (transfer_group.py) with its rank
(``first_rank`` + its TP rank), receives the manifest, checks it against the served model
(every name known, none missing, shapes and dtypes right: ``ShardWriter.check``), then receives
every bucket and copies the rows or columns of its shard (shard_plan.py, as the checkpoint
loader reads them) straight from the bucket into the model's parameters, in the model's dtype.
Two buffers of half a bucket each (the sender plans buckets of ``bucket_bytes / 2``) let the
next bucket arrive while the last one is copied: at most ``bucket_bytes`` are held beyond the
shard (and a 1 MiB staging chunk for the transposed output layer), never a second copy of the
model.

A rank whose check failed (or whose TP group's did: ``agree``) goes on receiving every bucket
without copying, so the trainer and the other replicas are not left waiting in a collective;
the weights are then untouched. So does a rank whose copy failed (its weights mixed). A failure once copying began (the trainer vanished, a
collective timed out) leaves them mixed: ``TransferProgress.touched`` says so.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..models.shard_plan import EMBEDDING, OUTPUT_LAYER, ShardPart, copy_into, shard_plan
from .manifest import FLOAT_DTYPES, Manifest, Piece, TensorInfo
from .transfer_group import TransferGroup, announce_label, connect_store, resolve_backend

_MAX_NAMES_SHOWN = 8
# The gist of a failed collective (gloo's messages run to several lines with an address).
_LOST = re.compile(r"Connection [a-z ]+ by peer|Socket closed|Broken pipe")
_TIMED_OUT = re.compile(r"[Tt]imed out|[Tt]imeout")


class UpdateRefused(ValueError):
    """An update this replica cannot take (a bad name, shape or dtype): nothing was copied."""


@dataclass
class TransferProgress:
    """What a transfer did so far (kept by the caller: filled in also when it fails)."""

    touched: bool = False  # some parameter was written: the weights may be mixed
    received_bytes: int = 0
    buffer_bytes: int = 0  # the receive buffer: the most this rank held beyond its shard


def broken_off(exc: Exception, done: int, total: int | None) -> ConnectionError:
    """A transfer collective that failed: where, and the gist of why."""
    text = str(exc)
    if _LOST.search(text):
        why = "connection lost"
    elif _TIMED_OUT.search(text):
        why = "timed out"
    else:
        why = f"{type(exc).__name__}: {text[:200]}"
    where = "before the manifest" if total is None else f"after {done} of {total} buckets"
    return ConnectionError(
        f"the weight transfer broke off {where} ({why}): the trainer vanished or stalled"
    )


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


class ShardWriter:
    """Copies the rows or columns of full Hugging Face tensors that this rank's parameters
    hold into them, in place."""

    def __init__(self, model: Any) -> None:
        self.tied = model.embed_tokens is model.lm_head
        params = dict(model.named_parameters())
        config = model.config
        self.targets: dict[str, list[tuple[torch.Tensor, ShardPart]]] = {}
        vocab_shape = (config.vocab_size, config.hidden_size)
        # A rank past the vocabulary's end holds no row of it, but the name is still known.
        self.shapes: dict[str, tuple[int, ...]] = {EMBEDDING: vocab_shape}
        if not self.tied:
            self.shapes[OUTPUT_LAYER] = vocab_shape
        for local, parts in shard_plan(config, model.layout, self.tied).items():
            for part in parts:
                self.targets.setdefault(part.name, []).append((params[local], part))
                self.shapes[part.name] = part.shape
        # A tied model's state_dict lists the output layer too: it is the embedding.
        self.ignored = {OUTPUT_LAYER} if self.tied else set()

    def check(self, manifest: Manifest) -> list[str]:
        """What keeps this rank from taking these tensors (empty: nothing)."""
        problems = []
        names = [t.name for t in manifest.tensors]
        seen: set[str] = set()
        duplicates = sorted({n for n in names if n in seen or seen.add(n)})
        if duplicates:
            problems.append(f"tensor(s) sent twice: {_names(duplicates)}")
        unknown = [n for n in names if n not in self.shapes and n not in self.ignored]
        if unknown:
            problems.append(f"unknown tensor(s), not in the served model: {_names(unknown)}")
        missing = sorted(set(self.shapes) - seen)
        if missing:
            problems.append(f"missing tensor(s): {_names(missing)}")
        for info in manifest.tensors:
            expected = self.shapes.get(info.name)
            if expected is not None and info.shape != expected:
                problems.append(
                    f"tensor {info.name!r} has shape {info.shape}, the served model needs "
                    f"{expected}"
                )
            if info.dtype not in FLOAT_DTYPES:
                problems.append(
                    f"tensor {info.name!r} has dtype {info.dtype}, not a floating-point one"
                )
        return problems

    def write(self, info: TensorInfo, start: int, rows: torch.Tensor) -> None:
        """Rows ``[start, start + len(rows))`` of tensor ``info``: copy this rank's part."""
        end = start + rows.shape[0]
        with torch.no_grad():
            for param, part in self.targets.get(info.name, ()):
                if part.dim == 1:
                    copy_into(param[start:end], rows[:, part.lo : part.hi])
                    continue
                part_lo, part_hi = (part.lo, part.hi) if part.dim == 0 else (0, part.rows)
                lo, hi = max(start, part_lo), min(end, part_hi)
                if lo < hi:
                    first = part.row + lo - part_lo
                    copy_into(param[first : first + hi - lo], rows[lo - start : hi - start])

    def write_bucket(self, buffer: torch.Tensor, bucket: list[Piece], manifest: Manifest) -> None:
        """Every piece of one received bucket."""
        for piece in bucket:
            info = manifest.tensors[piece.tensor]
            if info.name in self.ignored:
                continue
            n = piece.end - piece.start
            raw = buffer[piece.offset : piece.offset + n * info.row_bytes]
            rows = raw.view(FLOAT_DTYPES[info.dtype]).view(n, *info.shape[1:])
            self.write(info, piece.start, rows)


def receive_weights(
    model: Any,
    source: dict[str, Any],
    version: str,
    rank: int,
    world_size: int,
    timeout_s: float,
    agree: Callable[[list[str]], list[str]],
    progress: TransferProgress,
    device: torch.device | None = None,
) -> None:
    """Receive one update into ``model`` as transfer rank ``rank``.

    ``agree(problems)`` returns every problem of this rank's TP group (all ranks call it
    once, after the manifest); any refuses the update (UpdateRefused, weights untouched)."""
    started = time.monotonic()
    backend = resolve_backend(source.get("backend"))
    store = connect_store(source["store_host"], source["store_port"], timeout_s)
    announce_label(store, version)
    group = TransferGroup(store, version, rank, world_size, backend, timeout_s, device)
    try:
        try:
            manifest = Manifest.decode(group.broadcast_bytes(None))
        except RuntimeError as exc:
            raise broken_off(exc, 0, None) from None
        writer = ShardWriter(model)
        refused = agree(writer.check(manifest))
        count = len(manifest.buckets)
        size = manifest.max_bucket_bytes
        buffers = [torch.empty(size, dtype=torch.uint8, device=group.device) for _ in range(2)]
        progress.buffer_bytes = 2 * size

        def start(index: int) -> tuple[torch.Tensor, Any]:
            view = buffers[index % 2][: manifest.bucket_size(index)]
            return view, group.start_broadcast(view)

        pending = start(0) if count else None
        failed: Exception | None = None
        for index, bucket in enumerate(manifest.buckets):
            view, work = pending
            try:
                work.wait()
            except RuntimeError as exc:
                raise broken_off(exc, index, count) from None
            if index + 1 < count:
                pending = start(index + 1)  # the next arrives while this one is copied
            progress.received_bytes += view.numel()
            if not refused and failed is None:
                progress.touched = True
                try:
                    writer.write_bucket(view, bucket, manifest)
                except Exception as exc:  # noqa: BLE001 - receive on, so nobody waits on us
                    failed = exc
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the transfer took over {timeout_s:g} s")
    finally:
        group.close()
    if refused:
        raise UpdateRefused("; ".join(refused))
    if failed is not None:
        raise failed
