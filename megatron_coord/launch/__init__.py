"""Launching under torchrun: the per-rank wiring (``replica``) and the two entry points.

- ``replica``: parallel state, model, engine and engine server of this rank (``Replica``);
- ``coordinator_process``: the coordinator process global rank 0 spawns, and ends;
- ``arguments``: the command-line options both entry points share (``ReplicaOptions`` from them);
- ``generate_job``: serving a list of prompts through the launch's coordinator (``run_generate``);
- ``generate``: ``torchrun ... -m megatron_coord.launch.generate`` (the repository's
  ``launch/generate.py``, and the ``megatron-coord-generate`` command, run the same ``main``);
- ``serve``: likewise for serving until a client sends STOP.
"""

from __future__ import annotations

from .arguments import add_replica_arguments, options_from_args
from .coordinator_process import (
    COORDINATOR_START_TIMEOUT_S,
    reachable_address,
    spawn_coordinator,
    stop_process,
)
from .generate_job import read_prompts, run_generate
from .replica import Replica, ReplicaOptions

__all__ = [
    "COORDINATOR_START_TIMEOUT_S",
    "Replica",
    "ReplicaOptions",
    "add_replica_arguments",
    "options_from_args",
    "reachable_address",
    "read_prompts",
    "run_generate",
    "spawn_coordinator",
    "stop_process",
]
