"""Step fault injection for tests: make chosen model steps raise on chosen TP ranks, or slow.

Install in a launch with ``MEGATRON_COORD_STEP_HOOK=megatron_coord.testing.step_faults:from_env``
(engine/step_guard.py calls it once per rank) and configure it with:

* ``MEGATRON_COORD_FAULT_STEPS``: comma-separated step numbers (1 = the rank's first model step);
* ``MEGATRON_COORD_FAULT_TOKEN``: also fail every step whose batch holds a request whose prompt
  starts with this token id (independent of timing: a test picks which requests fail);
* ``MEGATRON_COORD_FAULT_TP_RANKS``: the TP ranks that raise (default: every rank);
* ``MEGATRON_COORD_FAULT_KIND``: ``error`` (RuntimeError, the default) or ``oom``
  (torch.OutOfMemoryError, as a CUDA allocation failure raises it);
* ``MEGATRON_COORD_FAULT_SLEEP_S``: every model step first sleeps this long (a slow engine: the
  GIL is released, as in a long kernel), failing or not.

The fault is raised right after sampling: the model's forward (and its collectives) returned,
tokens were appended and sampler RNGs advanced, so the step guard must undo all of it; a failure
it recovers from at any TP size.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from ..engine.engine import InferenceEngine, RunningRequest
from ..parallel_state import ParallelState


class StepFaults:
    """Raises after sampling during the chosen steps (``steps``) or for the chosen prompts."""

    def __init__(
        self,
        steps: set[int] = frozenset(),
        token: int | None = None,
        kind: str = "error",
        sleep_s: float = 0.0,
    ) -> None:
        if kind not in ("error", "oom"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self.steps = set(steps)
        self.token = token
        self.kind = kind
        self.sleep_s = sleep_s
        self.step = 0  # model steps this engine began
        self.raised = 0

    def install(self, engine: InferenceEngine) -> StepFaults:
        """Wrap ``engine``'s step counter and sampling (instance attributes: this engine only)."""
        compute, take = engine.compute_step, engine._take_tokens

        def counted_compute() -> Any:
            self.step += 1
            if self.sleep_s:
                time.sleep(self.sleep_s)
            return compute()

        def faulty_take(batch: list[RunningRequest], logits: torch.Tensor) -> None:
            take(batch, logits)
            if self._hit(batch):
                self.raised += 1
                raise self._error()

        engine.compute_step = counted_compute
        engine._take_tokens = faulty_take
        return self

    def _hit(self, batch: list[RunningRequest]) -> bool:
        if self.step in self.steps:
            return True
        return self.token is not None and any(r.new.prompt_tokens[0] == self.token for r in batch)

    def _error(self) -> Exception:
        where = f"step {self.step}"
        if self.kind == "oom":
            return torch.OutOfMemoryError(f"injected: CUDA out of memory at {where}")
        return RuntimeError(f"injected fault at {where}")


def _ints(name: str) -> set[int]:
    return {int(v) for v in os.environ.get(name, "").split(",") if v.strip()}


def from_env(engine: InferenceEngine, state: ParallelState) -> None:
    """The MEGATRON_COORD_STEP_HOOK entry point: configure from the environment (see above)."""
    ranks = _ints("MEGATRON_COORD_FAULT_TP_RANKS")
    if ranks and state.tp_rank not in ranks:
        return
    token = os.environ.get("MEGATRON_COORD_FAULT_TOKEN")
    StepFaults(
        _ints("MEGATRON_COORD_FAULT_STEPS"),
        int(token) if token else None,
        os.environ.get("MEGATRON_COORD_FAULT_KIND", "error"),
        float(os.environ.get("MEGATRON_COORD_FAULT_SLEEP_S", "0")),
    ).install(engine)
