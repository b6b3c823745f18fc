"""A failing model step fails its requests, not the replica (and not the torchrun world).

``StepGuard.step`` runs one engine step (``compute_step``), then the TP group agrees whether
every rank's attempt succeeded, and only then commits it (finished records, streaming chunks)
or undoes it, identically on every rank:

* **Agreement.** One ``all_reduce(MIN)`` of a one-element flag per step over a process group of
  its own (same ranks and backend as the TP group); only when the flag says some rank failed,
  an ``all_gather_object`` tells every rank who failed and why. At TP=1 nothing is exchanged.
  The group is separate so the flag never pairs with a collective of the model: a rank that
  fails and reaches the agreement while another is still inside the model waits there instead
  of feeding a model all-reduce with the wrong tensor.
* **Where a rank may fail.** ``compute_step`` keeps running the step's later forwards after a
  phase raised, so a rank that fails before or after the model's collectives (sampling, a
  check, an error in the step's wrapper) leaves its group in step: the failure is recovered.
  A rank that dies *inside* a forward (between two of its collectives) leaves the others
  waiting in that collective. That is not recoverable in-process: the step never ends, the
  step heartbeat stops after ``--max-step-time`` and the coordinator declares the replica dead
  an engine timeout later, failing its requests over (step_heartbeat.py).
* **Undo.** Every request of the batch (running and just admitted) leaves the engine, its KV
  slot freed, and gets an ``engine_failed`` error saying which rank raised what. Out of memory
  (``torch.OutOfMemoryError`` on every failing rank) is retried smaller instead: the request
  with the largest KV footprint (prompt + token budget) fails, the others start over from their
  prompt at the head of the queue (same seed, so the same tokens), except those that already
  streamed tokens to their client, which fail too. A batch that keeps running out of memory
  thus shrinks by one request per step until it fits.
* **Health.** After ``max_failures`` consecutive failed steps the replica is unhealthy (its
  heartbeat says ``"healthy": false`` and the coordinator routes nothing new to it); one
  successful step makes it healthy again. An unhealthy idle replica probes itself with a
  one-token request every ``probe_interval_s`` (server.py), so it can recover with no traffic.

Fault injection for tests: ``MEGATRON_COORD_STEP_HOOK=module:function`` names a function called
once, at construction, with ``(engine, state)``; it may wrap whatever it likes (see
megatron_coord.testing.step_faults). Unset (production), nothing is imported or wrapped.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..parallel_state import ParallelState
from .engine import InferenceEngine, PendingStep, RunningRequest, StepResult

log = logging.getLogger(__name__)

DEFAULT_MAX_STEP_FAILURES = 3
DEFAULT_PROBE_INTERVAL_S = 5.0
HOOK_ENV = "MEGATRON_COORD_STEP_HOOK"
_MAX_ERROR_TEXT = 300


@dataclass
class StepOutcome:
    """One guarded step: what to reply, and the requests to fail as ``(id, message)``."""

    result: StepResult
    failed: list[tuple[int, str]] = field(default_factory=list)
    error: str | None = None  # why the step failed (None: it succeeded)


def describe_error(exc: Exception, state: ParallelState) -> dict[str, Any]:
    """A rank's failure, small enough to gather: where, what, and whether it was OOM."""
    text = str(exc)
    if len(text) > _MAX_ERROR_TEXT:
        text = text[:_MAX_ERROR_TEXT] + "..."
    return {
        "tp_rank": state.tp_rank,
        "rank": state.rank,
        "type": type(exc).__name__,
        "text": text,
        "oom": isinstance(exc, torch.OutOfMemoryError),
    }


def error_message(errors: list[dict[str, Any]]) -> str:
    """'RuntimeError: boom on TP rank 1 (global rank 3)' for each failing rank."""
    return "; ".join(
        f"{e['type']}: {e['text']} on TP rank {e['tp_rank']} (global rank {e['rank']})"
        for e in errors
    )


def footprint(engine: InferenceEngine, running: RunningRequest) -> int:
    """The KV tokens a request may claim: the same on every rank, whatever the step did."""
    return min(len(running.new.prompt_tokens) + running.max_new_tokens, engine.max_seq_len)


def install_hook(engine: InferenceEngine, state: ParallelState) -> None:
    """Call the ``module:function`` named by $MEGATRON_COORD_STEP_HOOK (tests), if any."""
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return
    module, _, name = spec.partition(":")
    hook = getattr(importlib.import_module(module), name)
    log.warning("rank %d: step fault hook %s installed", state.rank, spec)
    hook(engine, state)


class StepGuard:
    """Runs engine steps so that a failing one fails its batch on every rank alike."""

    def __init__(
        self,
        engine: InferenceEngine,
        state: ParallelState,
        max_failures: int = DEFAULT_MAX_STEP_FAILURES,
    ) -> None:
        if max_failures < 0:
            raise ValueError("max_failures must be >= 0 (0: never unhealthy)")
        self.engine = engine
        self.state = state
        self.max_failures = max_failures
        self.consecutive_failures = 0
        self.failed_steps = 0
        self.group: Any = None
        if state.tensor_parallel_size > 1:
            self.group = _agreement_group(state)
            device = state.device if state.backend == "nccl" else torch.device("cpu")
            self._flag = torch.ones(1, dtype=torch.int32, device=device)
        install_hook(engine, state)

    @property
    def healthy(self) -> bool:
        """False after ``max_failures`` consecutive failed steps (until one succeeds)."""
        return self.max_failures == 0 or self.consecutive_failures < self.max_failures

    def step(self) -> StepOutcome:
        """One engine step, committed if every rank succeeded, else undone on every rank."""
        try:
            pending = self.engine.compute_step()
        except Exception as exc:  # noqa: BLE001 - before any phase: nothing to keep in step
            pending = PendingStep([], [], error=exc)
        errors = self._agree(pending.error)
        if not errors:
            self.consecutive_failures = 0
            return StepOutcome(self.engine.commit_step(pending))
        self.consecutive_failures += 1
        self.failed_steps += 1
        return self._recover(errors)

    def _agree(self, error: Exception | None) -> list[dict[str, Any]]:
        """Every failing rank's description (empty: all succeeded); the same on every rank."""
        mine = None if error is None else describe_error(error, self.state)
        if self.group is None:
            return [] if mine is None else [mine]
        self._flag.fill_(1 if mine is None else 0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MIN, group=self.group)
        if int(self._flag.item()) == 1:
            return []
        gathered: list[Any] = [None] * self.state.tensor_parallel_size
        dist.all_gather_object(gathered, mine, group=self.group)
        return [e for e in gathered if e is not None]

    def _recover(self, errors: list[dict[str, Any]]) -> StepOutcome:
        """Undo a failed step: fail (or, after OOM, partly requeue) every request of it."""
        engine = self.engine
        why = error_message(errors)
        batch = list(engine.active.values())
        if all(e["oom"] for e in errors):
            failed, keep = self._shrink(batch, why)
        else:
            failed, keep = [(r, f"the model step failed: {why}") for r in batch], []
        for running, _ in failed:
            engine.discard(running)
        engine.requeue(keep)
        if self.state.is_tp_coordinator:
            log.error(
                "dp rank %d: model step failed (%d in a row): %s; %d request(s) failed, "
                "%d requeued",
                self.state.dp_rank,
                self.consecutive_failures,
                why,
                len(failed),
                len(keep),
            )
        # Records finished outside the step (aborts, zero budgets) still go out.
        result = engine.commit_step(PendingStep([], []))
        return StepOutcome(result, [(r.request_id, text) for r, text in failed], why)

    def _shrink(
        self, batch: list[RunningRequest], why: str
    ) -> tuple[list[tuple[RunningRequest, str]], list[RunningRequest]]:
        """Out of memory: the largest request fails, and those that streamed (they cannot
        start over unseen); the others are kept to run again, one request lighter."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        engine = self.engine
        victim = max(batch, key=lambda r: (footprint(engine, r), r.request_id), default=None)
        failed, keep = [], []
        for running in batch:
            if running is victim:
                note = "this request was the largest of the batch"
            elif running.streamed:
                note = "this request had streamed tokens and cannot start over"
            else:
                keep.append(running)
                continue
            failed.append((running, f"out of memory in the model step ({why}); {note}"))
        return failed, keep


def _agreement_group(state: ParallelState) -> Any:
    """A process group with the TP group's ranks, for the step flag alone.

    ``new_group`` is collective over the whole world: every rank creates every TP group's
    copy, in the same order, as parallel_state.initialize does for the TP groups.
    """
    mine = None
    size = state.tensor_parallel_size
    for first in range(0, state.world_size, size):
        ranks = list(range(first, first + size))
        group = dist.new_group(ranks)
        if state.rank in ranks:
            mine = group
    return mine
