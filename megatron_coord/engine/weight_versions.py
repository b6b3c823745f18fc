"""What a new weight version does inside the engine: to its requests, their KV and its cache.

Applied at a step boundary, on every rank of the replica alike (``change_version``), once the
new weights are in the parameters (weight_updates.py):

* **Requests in flight** (running ones; a queued request has no token and no KV yet, so it
  simply runs under the new weights). ``abort``: each ends with its tokens so far
  (``finish_reason`` "aborted"). ``keep``: each goes on decoding over its KV under the new
  weights, so its spans show both versions. ``recompute``: each one's KV is rebuilt under the
  new weights (``rebuild_kv``) before it goes on. ``stale_versions`` (the staleness bound)
  also aborts, whatever the mode, each one whose first token came from one of those versions.
* **Attribution.** A request keeps marks, not per-token labels (running.py): an update adds
  ``(generated so far, new)`` to its weight marks and, under keep, ``(positions with KV, new)``
  to its KV marks; a rebuild resets them to ``[(0, new)]``.
* **No stale KV.** The prefix cache forgets every block (kv_blocks.py ``reset_cache``): those
  no request holds are freed, those running requests hold stay theirs. A kept request's blocks
  carry the old version's salt, so none of them is ever cached again; a recomputed request's
  blocks are named again under the new one, so later prompts reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..prefix_hash import version_salt

# The engine and its requests are duck-typed here: engine.py and running.py import this module.

MODES = ("abort", "keep", "recompute")


def spans(marks: list[tuple[int, str]], end: int) -> list[list[Any]]:
    """``[[start, stop, version], ...]`` covering ``[0, end)`` from ``(start, version)`` marks
    (later marks win; empty spans dropped, equal neighbours merged)."""
    out: list[list[Any]] = []
    for i, (start, version) in enumerate(marks):
        stop = min(marks[i + 1][0] if i + 1 < len(marks) else end, end)
        if stop <= start:
            continue
        if out and out[-1][2] == version and out[-1][1] == start:
            out[-1][1] = stop
        else:
            out.append([start, stop, version])
    return out


@dataclass
class VersionChange:
    """What a version change did: the records of the requests it ended, and counts."""

    finished: list[dict[str, Any]] = field(default_factory=list)
    aborted: int = 0
    recomputed: int = 0


def change_version(
    engine: Any, version: str, mode: str = "keep", stale_versions: Any = ()
) -> VersionChange:
    """Move the engine to ``version`` (its weights already are), as ``mode`` says."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    stale = set(stale_versions or ())
    change = VersionChange()
    running = list(engine.active.values())
    kept = []
    for request in running:
        if mode == "abort" or request.first_version in stale:
            engine.finish(request, "aborted", change.finished)
            change.aborted += 1
        else:
            kept.append(request)
    engine.weight_version = version
    engine.blocks.reset_cache(version_salt(version))
    for request in kept:
        request.weight_marks.append((len(request.generated), version))
        if mode == "keep":
            request.kv_marks.append((request.length - 1, version))
    if mode == "recompute" and kept:
        if not engine.suspended:  # suspended: its KV is gone, resume() rebuilds it
            rebuild_kv(engine, kept)
        change.recomputed = len(kept)
    return change


def rebuild_kv(engine: Any, requests: list[Any]) -> None:
    """Recompute the KV of ``requests`` (every position but the newest token's, which the next
    decode computes) under the current weights, in their own blocks; name their full blocks.

    One forward per request, skipping the leading blocks an earlier one of them rebuilt (two
    requests share blocks only as a common prefix of full blocks, so none is written twice)."""
    size = engine.blocks.block_size
    salt = engine.blocks.salt
    version = engine.weight_version
    done: set[int] = set()
    for request in requests:
        end = request.length - 1
        skip = 0
        while skip < len(request.blocks) and request.blocks[skip] in done:
            skip += 1
        start = min(skip * size, end)
        if start < end:
            tokens = torch.tensor([request.tokens(start, end)], device=engine.device)
            starts = torch.tensor([start], device=engine.device)
            table = engine.block_table([request], [end])
            engine.model.hidden_states(tokens, starts, table, engine.kv_cache, last_only=True)
        done.update(request.blocks[: end // size])
        request.kv_marks = [(0, version)]
        request.salt = salt
        request.named = 0
        if engine.blocks.caching:
            engine.name_blocks(request)
