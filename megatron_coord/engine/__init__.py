"""One model replica: the continuous-batching engine and the loop that serves it.

- ``engine``: continuous batching over a slot-indexed KV cache (``InferenceEngine``);
- ``sampling``: per-request greedy / temperature / top-k / top-p sampling;
- ``server``: the per-replica serving loop (``EngineServer``): the TP-coordinator talks to the
  coordinator over ZMQ, every rank steps the engine on the same batch; beside it
  ``coordinator_link`` (the socket, registration, losing and rejoining the coordinator),
  ``control`` (control signals, shutdown, drain), ``heartbeats`` (HEARTBEAT load reports),
  ``step_heartbeat`` (heartbeats during long steps), ``step_guard`` (failed steps) and
  ``rejoining`` (registering again with what it holds; REGISTER_ACK);
- ``tp_broadcast``: each step's requests and signals packed (``megatron_coord._C``) and
  broadcast to the tensor-parallel group.
"""

from .coordinator_link import engine_identity
from .engine import InferenceEngine, StepResult
from .server import EngineServer

__all__ = ["EngineServer", "InferenceEngine", "StepResult", "engine_identity"]
