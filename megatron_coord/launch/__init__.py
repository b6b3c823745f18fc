"""Launching under torchrun: the per-rank wiring (``replica``) and the two entry points.

- ``replica``: parallel state, the spawned coordinator, one engine server per rank;
- ``generate``: ``torchrun ... -m megatron_coord.launch.generate`` (the repository's
  ``launch/generate.py``, and the ``megatron-coord-generate`` command, run the same ``main``);
- ``serve``: likewise for serving until a client sends STOP.
"""

from __future__ import annotations

from .replica import (
    COORDINATOR_START_TIMEOUT_S,
    Replica,
    ReplicaOptions,
    add_replica_arguments,
    options_from_args,
    reachable_address,
    read_prompts,
    run_generate,
    spawn_coordinator,
    stop_process,
)

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
