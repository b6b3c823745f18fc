"""The coordinator process: one ROUTER between clients and data-parallel engines.

``DataParallelInferenceCoordinator`` (coordinator.py) keeps Megatron-core's API; its state lives
in the parts it is composed of (see coordinator.py's docstring for the map), and message
handling is a table from header to handler for clients (client_handlers.py) and engines
(engine_handlers.py): adding a message is one entry and one function.
``python -m megatron_coord.coordinator`` runs the standalone coordinator (standalone.py).
"""

from .coordinator import DataParallelInferenceCoordinator

__all__ = ["DataParallelInferenceCoordinator"]
