"""A replica's weight updates: one spec, applied by every rank of the replica at one step boundary.

The coordinator's ``[UPDATE_WEIGHTS, update_id, spec]`` reaches the TP-coordinator's socket,
which passes it to its group in a step's broadcast (a payload signal, tp_broadcast.py); every
rank then runs ``WeightUpdater.apply`` between the same two steps, so no step ever runs on two
versions, and the TP-coordinator answers ``UPDATE_WEIGHTS_DONE`` (server.py). The source:

* ``checkpoint``: each rank reads its shard of an HF safetensors directory into the parameters
  in place (models/checkpoint.py ``load_weights``: shapes checked before the first copy);
* ``distributed``: each rank joins the trainer's transfer group and keeps its shard of every
  tensor broadcast (megatron_coord.weights.receiver);
* ``in_place``: the parameters were changed by their owner (a training script sharing the
  model): nothing to load, only the version and what it implies.

Then the engine moves to the new version (weight_versions.py: the mode for the requests in
flight, the staleness bound, the prefix cache).

**All or nothing in a replica.** The ranks agree, over the step guard's agreement group, once
before the first copy (a bad name, shape or dtype on any rank: no rank copies anything, the
weights stay the old version's and the replica serves on) and once at the end. A failure once
copying began (the trainer vanished mid-transfer, a collective timed out, a read failed)
leaves the weights mixed: the replica does not serve (``engine.weights_broken``; its requests
wait, it reports itself unhealthy so the coordinator routes nothing to it, and never steps)
until a later update succeeds. Either way the result says ok=false and why, naming the
tensor and the rank.

``EngineServer.apply_update`` / ``update_in_place`` (server.py) run the same path from inside
the serving processes, without a socket round trip (a training loop sharing the model).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..models.checkpoint import load_weights
from ..parallel_state import ParallelState
from ..weights.receiver import TransferProgress, UpdateRefused, receive_weights
from ..weights.transfer_group import resolve_backend
from .engine import InferenceEngine
from .weight_versions import MODES

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
MAX_VERSION_CHARS = 128
SOURCES = ("checkpoint", "distributed", "in_place")


@dataclass
class UpdateOutcome:
    """An update's UPDATE_WEIGHTS_DONE result, and the records of the requests it ended."""

    result: dict[str, Any]
    finished: list[dict[str, Any]] = field(default_factory=list)


def _checked(spec: Any) -> tuple[str, str, list[str], dict[str, Any], float]:
    """(version, mode, stale versions, source, timeout) of a spec; ValueError naming a bad
    field (the coordinator checked it already: this guards the in-process entry). The
    coordinator adds ``stale_versions``, and ``first_rank`` / ``world_size`` for the
    distributed source."""
    if not isinstance(spec, dict):
        raise ValueError(f"the update spec must be a dict, not {type(spec).__name__}")
    version = spec.get("version")
    if not isinstance(version, str) or not 0 < len(version) <= MAX_VERSION_CHARS:
        raise ValueError(f"version must be a string of 1 to {MAX_VERSION_CHARS} characters")
    mode = spec.get("mode") or "keep"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    stale = spec.get("stale_versions") or []
    if not isinstance(stale, list) or not all(isinstance(v, str) for v in stale):
        raise ValueError("stale_versions must be a list of version labels")
    source = spec.get("source")
    if not isinstance(source, dict) or source.get("kind") not in SOURCES:
        raise ValueError(f"source must be a dict whose kind is one of {', '.join(SOURCES)}")
    timeout = spec.get("timeout_s", DEFAULT_TIMEOUT_S)
    if type(timeout) not in (int, float) or not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout_s must be a positive number, not {timeout!r}")
    return version, mode, stale, source, float(timeout)


def _describe(exc: BaseException) -> str:
    """An error for the caller: the message of the errors that explain themselves."""
    if isinstance(exc, KeyError):
        return str(exc.args[0]) if exc.args else "KeyError"
    if isinstance(exc, ValueError | OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class WeightUpdater:
    """Applies weight updates on this rank, in step with the other ranks of its replica."""

    def __init__(self, engine: InferenceEngine, state: ParallelState, group: Any = None) -> None:
        self.engine = engine
        self.state = state
        self.group = group  # the TP ranks' agreement group (None at TP = 1)
        self.done = 0
        self.failed = 0
        self._agreed = False  # this update passed its agreement before the first copy

    # ----------------------------------------------------------------- agreement
    def _gather(self, mine: Any) -> list[Any]:
        """Every TP rank's ``mine``, in TP-rank order (collective over the group)."""
        if self.group is None:
            return [mine]
        gathered: list[Any] = [None] * self.state.tensor_parallel_size
        dist.all_gather_object(gathered, mine, group=self.group)
        return gathered

    def _where(self, tp_rank: int) -> str:
        if self.state.tensor_parallel_size == 1:
            return ""
        return f"TP rank {tp_rank} (global rank {self.state.tp_src_rank + tp_rank}): "

    def _merge(self, every: list[list[str]]) -> list[str]:
        """Each rank's problems, one list: one every rank has is said once, the others name
        their rank."""
        merged: list[str] = []
        for rank, mine in enumerate(every):
            for problem in mine:
                if all(problem in other for other in every):
                    if problem not in merged:
                        merged.append(problem)
                else:
                    merged.append(self._where(rank) + problem)
        return merged

    def agree(self, problems: list[str]) -> list[str]:
        """Every rank's problems (the same list on every rank: see ``_merge``)."""
        self._agreed = True
        return self._merge(self._gather(list(problems)))

    def _refuse_unless_agreed(self, problems: list[str]) -> None:
        refused = self.agree(problems)
        if refused:
            raise UpdateRefused("; ".join(refused))

    # ----------------------------------------------------------------- applying
    def apply(self, spec: Any) -> UpdateOutcome:
        """Apply one update spec on this rank (every rank of the replica calls it together)."""
        started = time.monotonic()
        engine = self.engine
        progress = TransferProgress()
        error = None
        version, mode, stale, source = None, "keep", [], None
        self._agreed = False
        try:
            version, mode, stale, source, timeout_s = _checked(spec)
            self._load(spec, version, source, timeout_s, progress)
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator
            error = _describe(exc)
            if source is not None and source["kind"] != "in_place" and not self._agreed:
                # Failed before the agreement its peers may be waiting in: join it, so every
                # rank of the group makes the same collectives (and says the same error).
                error = "; ".join(self.agree([error]))
        mine = (error, progress.touched, engine.weight_bytes, progress.buffer_bytes)
        every = self._gather(mine)
        errors = self._merge([[e] if e is not None else [] for e, *_ in every])
        message = "; ".join(errors)
        outcome = UpdateOutcome(
            {
                "ok": not errors,
                "version": engine.weight_version,
                "error": message or None,
                "aborted": 0,
                "recomputed": 0,
                "weight_bytes": sum(m[2] for m in every),
                "buffer_bytes": max(m[3] for m in every),
                "received_bytes": progress.received_bytes,
            }
        )
        if errors:
            self.failed += 1
            if any(m[1] for m in every):
                engine.weights_broken = f"the update to {version!r} failed midway: {message}"
            self._log_failure(version, message, engine.weights_broken is not None)
        else:
            self.done += 1
            engine.weights_broken = None
            change = engine.change_version(version, mode, stale)
            outcome.finished = change.finished
            outcome.result.update(
                version=version, aborted=change.aborted, recomputed=change.recomputed
            )
        outcome.result["duration_s"] = time.monotonic() - started
        return outcome

    def _load(
        self,
        spec: dict[str, Any],
        version: str,
        source: dict[str, Any],
        timeout_s: float,
        progress: TransferProgress,
    ) -> None:
        """Put the new weights in the parameters (nothing for in_place)."""
        kind = source["kind"]
        model = self.engine.model
        if kind == "checkpoint":
            path = source.get("path")
            if not isinstance(path, str):
                raise ValueError("the checkpoint source needs a path")

            def before_copy(problems: list[str]) -> None:
                prefixed = [f"checkpoint {path!r}: {p}" for p in problems]
                self._refuse_unless_agreed(prefixed)
                progress.touched = True

            load_weights(model, path, before_copy)
        elif kind == "distributed":
            first_rank, world_size = spec.get("first_rank"), spec.get("world_size")
            if type(first_rank) is not int or type(world_size) is not int:
                raise ValueError("the distributed source needs first_rank and world_size")
            backend = resolve_backend(source.get("backend"))
            device = self.state.device if backend == "nccl" else None
            receive_weights(
                model,
                source,
                version,
                first_rank + self.state.tp_rank,
                world_size,
                timeout_s,
                self.agree,
                progress,
                device,
            )
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def _log_failure(self, version: str | None, message: str, broken: bool) -> None:
        if not self.state.is_tp_coordinator:
            return
        log.error(
            "dp rank %d: weight update to %r failed: %s%s",
            self.state.dp_rank,
            version,
            message,
            "; the weights may be mixed: not serving until a later update succeeds"
            if broken
            else "; the weights are unchanged",
        )
