"""The coordinator process: one ROUTER between clients and data-parallel engines.

- ``coordinator``: ``DataParallelInferenceCoordinator`` (Megatron's class and API) and its loop;
- ``elastic``, ``liveness``, ``limits``: engines that join and die, clients that vanish,
  deadlines, limits and graceful shutdown;
- ``routing``: the routing policies (round robin, least loaded);
- ``standalone``: ``python -m megatron_coord.coordinator``, a coordinator that outlives replicas.
"""

from .coordinator import DataParallelInferenceCoordinator

__all__ = ["DataParallelInferenceCoordinator"]
