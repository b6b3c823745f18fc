"""torchrun wiring: parallel state, the coordinator process, one engine server per rank.

Global rank 0 spawns the coordinator (coordinator_process.py) and shares its address with every
rank through torch.distributed. Each rank loads its shard of the model; the TP-coordinator of
each replica connects and registers. ``Replica.serve()`` runs the
engine loop until STOP (from a client), SIGINT or SIGTERM, then tears everything down, the
coordinator process included, so no process outlives the launch.

SIGTERM or SIGINT (torchrun forwards them to every worker's process group, so the coordinator
gets it too; rank 0 also passes it on) drains: the coordinator refuses new requests with
``shutting_down``, gives those in flight ``shutdown_grace_s`` to finish, fails the rest with
``shutting_down``, then sends every engine STOP, which ends every rank's loop. Meanwhile every
rank keeps stepping; one that sees no STOP within ``drain_s()`` leaves anyway, and a second
signal ends a rank at once. A joined replica (``coordinator_address``) stops at once instead:
the outside coordinator resubmits its requests elsewhere.

Nothing outlives its launcher (``megatron_coord.lifetime``): a worker is SIGKILLed by the
kernel when its torchrun agent dies (its launcher is gone, so there is nothing to drain for),
and rank 0's coordinator and HTTP children end when rank 0 does.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .. import parallel_state
from ..coordinator.shutdown import DEFAULT_SHUTDOWN_GRACE_S, STOP_ROUND_S
from ..engine.coordinator_link import DEFAULT_JOIN_TIMEOUT_S, joined_identity
from ..engine.engine import INITIAL_VERSION, InferenceEngine
from ..engine.kv_blocks import DEFAULT_BLOCK_SIZE
from ..engine.server import EngineServer
from ..engine.step_guard import DEFAULT_MAX_STEP_FAILURES
from ..engine.step_heartbeat import DEFAULT_MAX_STEP_S
from ..exit_codes import ConfigurationError, PeerLostError
from ..lifetime import die_with_parent
from ..liveness_contract import DEFAULT_HEARTBEAT_INTERVAL_S
from ..parallel_state import ParallelState
from .coordinator_process import reachable_address, spawn_coordinator, stop_process

# A draining rank waits this much past the grace and the STOP round for its STOP.
DRAIN_MARGIN_S = 2.0


@dataclass
class ReplicaOptions:
    """What a launch script decides: model, parallelism, batching, coordinator settings."""

    model: str | None = None
    tensor_parallel_size: int = 1
    max_batch_size: int = 8
    max_seq_len: int | None = None
    # Paged KV cache: prefix caching on/off, positions per block, pool size (None: the memory
    # of a max-length sequence per batch slot).
    prefix_caching: bool = True
    kv_block_size: int = DEFAULT_BLOCK_SIZE
    kv_blocks: int | None = None
    port: int | None = None
    deterministic_mode: bool = False
    dtype: torch.dtype = torch.float32
    coordinator_host: str = "127.0.0.1"
    idle_timeout_s: float = 1.0
    # The coordinator's REGISTER_ACK may ask for faster heartbeats, unless the user fixed it.
    heartbeat_interval_s: float | None = DEFAULT_HEARTBEAT_INTERVAL_S
    heartbeat_interval_fixed: bool = False
    max_step_s: float = DEFAULT_MAX_STEP_S  # a step longer than this is a hang
    max_step_failures: int = DEFAULT_MAX_STEP_FAILURES  # failed steps in a row: unhealthy
    # SIGTERM/SIGINT: seconds in-flight requests get to finish before they fail (the drain).
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    coordinator_options: dict[str, Any] = field(default_factory=dict)
    # Join an outside coordinator (python -m megatron_coord.coordinator) instead of spawning
    # one: this job's replicas then fail alone, and leave it after coordinator_timeout_s of
    # silence from it. auth_keys: CURVE key directory (megatron_coord.auth) for the socket.
    coordinator_address: str | None = None
    coordinator_timeout_s: float = 10.0
    # Lost, register again (a restarted coordinator gets the replica back) instead of exiting.
    coordinator_reconnect: bool = True
    # Joined: seconds to wait for the coordinator's first answer after each registration.
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S
    auth_keys: str | None = None
    # The label of the weights loaded at start (a weight update gives the next one).
    weights_version: str = INITIAL_VERSION

    def drain_s(self) -> float:
        """How long a signalled rank serves on, at most, waiting for the coordinator's STOP."""
        return self.shutdown_grace_s + STOP_ROUND_S + DRAIN_MARGIN_S


class Replica:
    """This rank's part of a launch: state, model, engine, server, and (rank 0) the coordinator."""

    def __init__(self, options: ReplicaOptions) -> None:
        from ..models.checkpoint import load_model
        from ..models.default_model import default_checkpoint_dir

        # First: a worker whose torchrun agent died is killed outright (no drain: nobody is
        # left to report to); its coordinator and HTTP children follow by their own signal.
        die_with_parent(signal.SIGKILL)
        self.options = options
        self.state: ParallelState = parallel_state.initialize(options.tensor_parallel_size)
        self.coordinator: multiprocessing.process.BaseProcess | None = None
        self.ready_event: Any = None
        try:
            self.model_path = options.model or default_checkpoint_dir()
            self.address = self._share_coordinator_address()
            self._build(load_model(self.model_path, self.state, dtype=options.dtype))
        except BaseException:
            self._abandon()
            raise

    def _abandon(self, coordinator_grace_s: float = 0.5) -> None:
        """End the coordinator child (rank 0) and leave the process group. Also after a start
        that failed (a port taken, a bad checkpoint), so the process exits with its error, not
        an abort (a gloo thread left running at exit makes C++ call terminate)."""
        if self.coordinator is not None:
            stop_process(self.coordinator, coordinator_grace_s)
            self.coordinator = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def _build(self, model: Any) -> None:
        """The engine and its server, over this rank's shard of the model."""
        options = self.options
        self.engine = InferenceEngine(
            model,
            max_batch_size=options.max_batch_size,
            max_seq_len=options.max_seq_len,
            data_parallel_rank=self.state.dp_rank,
            prefix_caching=options.prefix_caching,
            kv_block_size=options.kv_block_size,
            kv_blocks=options.kv_blocks,
            weight_version=options.weights_version,
        )
        self.server = EngineServer(
            self.engine,
            self.state,
            self.address if self.state.is_tp_coordinator else None,
            deterministic_mode=options.deterministic_mode,
            idle_timeout_s=options.idle_timeout_s,
            coordinator_alive=self.coordinator.is_alive if self.coordinator is not None else None,
            heartbeat_interval_s=options.heartbeat_interval_s,
            heartbeat_interval_fixed=options.heartbeat_interval_fixed,
            max_step_s=options.max_step_s,
            max_step_failures=options.max_step_failures,
            **self._drain_options(),
            **self._join_options(),
        )

    def _drain_options(self) -> dict[str, Any]:
        """EngineServer options for draining on SIGTERM/SIGINT: only where this launch owns
        its coordinator (it STOPs the engines once drained); rank 0 passes the signal on."""
        if self.options.coordinator_address is not None:
            return {}
        return {"drain_s": self.options.drain_s(), "on_drain": self._forward_drain}

    def _forward_drain(self) -> None:
        """From the signal handler: SIGTERM the coordinator, which drains (torchrun's signal
        usually reached it already; a second request changes nothing)."""
        if self.coordinator is not None and self.coordinator.is_alive():
            self.coordinator.terminate()

    def _join_options(self) -> dict[str, Any]:
        """EngineServer options for a replica joining an outside coordinator (else none but
        auth): a unique identity, so a restarted replica or another job never collides."""
        out: dict[str, Any] = {"auth_keys": self.options.auth_keys}
        if self.options.coordinator_address is not None:
            out["identity"] = joined_identity(self.state.dp_rank)
            out["coordinator_timeout_s"] = self.options.coordinator_timeout_s
            out["reconnect"] = self.options.coordinator_reconnect
            out["join_timeout_s"] = self.options.join_timeout_s
        return out

    def _share_coordinator_address(self) -> str:
        """Rank 0 spawns the coordinator; every rank learns its address."""
        if self.options.coordinator_address is not None:
            return self.options.coordinator_address
        box: list[Any] = [None]
        if self.state.rank == 0:
            try:
                options = {
                    "host": self.options.coordinator_host,
                    "shutdown_grace": self.options.shutdown_grace_s,
                    "shutdown_stops_engines": True,
                }
                if self.options.auth_keys is not None:
                    options["auth_keys"] = self.options.auth_keys
                options.update(self.options.coordinator_options)
                self.coordinator, address, self.ready_event = spawn_coordinator(
                    self.state.data_parallel_size,
                    self.model_path,
                    self.options.port,
                    self.options.deterministic_mode,
                    options,
                )
                # Bound on every interface (multi-node): hand out rank 0's torchrun address.
                box[0] = reachable_address(address, os.environ.get("MASTER_ADDR", "127.0.0.1"))
            except Exception as exc:
                box[0] = exc  # tell the other ranks instead of leaving them in the collective
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            if isinstance(box[0], ConfigurationError):
                raise box[0]  # a port taken, a bad option: the user's to fix (exit code 2)
            raise RuntimeError(f"rank 0 could not start the coordinator: {box[0]}")
        return box[0]

    @property
    def is_global_rank0(self) -> bool:
        return self.state.rank == 0

    def serve(self) -> None:
        """Run the engine loop until STOP/SIGINT/SIGTERM, then shut everything down."""
        self.server.install_signal_handlers()
        try:
            self.server.run()
        finally:
            self.shutdown()
        if self.server.refused:  # its settings cannot work with that coordinator's
            raise ConfigurationError(self.server.lost_reason)
        if self.server.coordinator_lost:
            # A non-zero exit makes torchrun end the other replicas too.
            raise PeerLostError(self.server.lost_reason or "the coordinator was lost")

    def shutdown(self) -> None:
        """Close sockets, end the coordinator process (rank 0), leave the process group."""
        self.server.close()
        # After a STOP round trip (a client's, or the drain's) the coordinator exits by itself;
        # else (a second signal, a drain that never ended) it gets SIGTERM.
        self._abandon(10.0 if self.server.stop_received else 0.5)
