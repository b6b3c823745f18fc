"""One model replica: the continuous-batching engine and the loop that serves it.

- ``engine``: continuous batching over a slot-indexed KV cache (``InferenceEngine``);
- ``sampling``: per-request greedy / temperature / top-k / top-p sampling;
- ``server``: the per-replica serving loop (``EngineServer``): the TP-coordinator talks to the
  coordinator over ZMQ, every rank steps the engine on the same batch;
- ``tp_broadcast``: each step's requests and signals packed (``megatron_coord._C``) and
  broadcast to the tensor-parallel group.
"""

from .engine import InferenceEngine, StepResult
from .server import EngineServer, engine_identity

__all__ = ["EngineServer", "InferenceEngine", "StepResult", "engine_identity"]
