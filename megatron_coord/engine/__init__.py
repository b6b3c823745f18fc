"""One model replica: the continuous-batching engine and the loop that serves it.

- ``engine``: continuous batching over a paged KV cache (``InferenceEngine``); ``running``: a
  request inside it (``RunningRequest``, its record and streaming chunks);
- ``sampling``: the batched sampler (``Sampler``), with ``logits_processors`` (logit bias,
  min-tokens, penalties, top-k / min-p / top-p over [B, V]), ``token_counts`` (per-slot counts
  for the penalties), ``gumbel`` (counter-based noise) and ``log_probs`` (raw log-probs, top-N,
  prompt scores a chunk of positions at a time);
- ``server``: the per-replica serving loop (``EngineServer``): the TP-coordinator talks to the
  coordinator over ZMQ, every rank steps the engine on the same batch; beside it
  ``coordinator_link`` (the socket, registration, losing and rejoining the coordinator),
  ``control`` (control signals, shutdown, drain), ``heartbeats`` (HEARTBEAT load reports),
  ``step_heartbeat`` (heartbeats during long steps), ``step_guard`` (failed steps) and
  ``rejoining`` (registering again with what it holds; REGISTER_ACK);
- ``tp_broadcast``: each step's requests and signals packed (``megatron_coord._C``) and
  broadcast to the tensor-parallel group;
- ``weight_updates``: a replica's weight updates (``WeightUpdater``: checkpoint, distributed
  or in-place source, all or nothing across its ranks), ``weight_versions`` (what a new
  version does to the requests in flight, their version spans and the prefix cache) and
  ``suspension`` (SUSPEND / RESUME: the KV cache freed, the weights offloaded, both restored).
"""

from .coordinator_link import engine_identity
from .engine import InferenceEngine, StepResult
from .server import EngineServer

__all__ = ["EngineServer", "InferenceEngine", "StepResult", "engine_identity"]
