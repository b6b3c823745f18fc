"""``TrainingInference``: serving a training script's own model through the coordinator.

Built on every rank of the script's initialized torchrun world (gloo on CPU, NCCL on GPU), over
the script's ``LlamaModel`` (already sharded for its TP rank) and tokenizer; DP x TP laid out
as our launch does (parallel_state.py: DP = world / TP, contiguous TP groups). Global rank 0
spawns the coordinator, as the launch does; every replica serves; each rank has its own
``InferenceClient`` (an asyncio loop in a thread), so each rank may ``generate`` its own
prompts (SPMD) while the coordinator spreads all of them over all replicas, or rank 0 alone
may. The engine serves the very parameters the optimizer steps: ``update_weights`` copies
nothing, it moves every replica to the new version at a step boundary (``update_in_place``).

**Why serving and training collectives never meet.** Each rank runs its EngineServer loop
in a daemon thread (colocated/serving_thread.py), on serving process groups of its own (new
groups, never the script's; colocated/layout.py); the model's forward takes the serving TP
group in that thread alone (``TPGroup.use_group_in_this_thread``). And serving runs only
between ``resume()`` and ``suspend()``:

1. ``suspend()`` (every rank) first waits, over a control group of its own, for every rank to
   have called it, so no rank's ``generate`` still waits on a replica; then rank 0 sends
   SUSPEND through the coordinator. It reaches every replica's TP-coordinator, which passes it
   to its ranks in a step's broadcast: every rank of the replica applies it at the same step
   boundary (the KV cache is freed). After that step each rank's serving thread **parks** on a
   local ``threading.Event``, with no collective pending; ``suspend()`` returns once this
   rank's thread is parked. From then on the script's thread owns every process group.
2. ``update_weights()`` (every rank, after the optimizer step, while suspended, or it suspends
   and resumes around itself) calls ``update_in_place`` in the script's thread while the
   serving thread is parked, so its agreement collectives (over the serving agreement group)
   run where no serving collective can; then it gathers every rank's outcome over the control
   group, so it returns once every replica has the version.
3. ``resume()`` unparks this rank's thread and rank 0 sends RESUME (the KV cache is rebuilt);
   it returns once this rank's engine serves again.

So the rule for a script: call ``suspend``, ``update_weights``, ``resume`` and ``shutdown``
on every rank at the same point, and train (the script's collectives) only while suspended;
``generate`` refuses to run while suspended. A parked TP-coordinator keeps heartbeating, so a
long training phase does not look like a dead replica.

**Replicas elsewhere.** With ``replicas="tcp://host:port"`` (a serving launch's coordinator, or
a standalone one with joined replicas) the same loop runs unchanged: no coordinator and no
serving here, every rank a client of that one; ``update_weights`` sends the weights over
torch.distributed (rank 0's ``WeightSender`` through the client's ``update_weights``; every
rank rebuilds the whole tensors from its shard, models/hf_export.py), ``suspend``/``resume``
only keep the ranks together (colocated/remote.py).

**Ending.** ``shutdown()`` (or leaving a ``with`` block) on every rank: rank 0 sends STOP, every
serving loop ends, the coordinator process exits. Leaving the ``with`` block by an exception, or
the interpreter exiting without shutdown, ends only this rank's part (no collective: its peers
may be gone): rank 0's coordinator is ended at once, and torchrun ends the rest of the world
when this rank exits non-zero. Nothing outlives the world: every rank dies with its torchrun
agent, the coordinator with rank 0 (megatron_coord.lifetime).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from .colocated.client_thread import ClientThread, GenerationError
from .colocated.layout import destroy, gather, serving_layout, share
from .colocated.remote import RemoteReplicas
from .colocated.serving_thread import ServingThread
from .engine.engine import InferenceEngine
from .engine.kv_blocks import DEFAULT_BLOCK_SIZE
from .engine.server import EngineServer
from .engine.step_heartbeat import DEFAULT_MAX_STEP_S
from .engine.weight_updates import MAX_VERSION_CHARS
from .engine.weight_versions import MODES
from .launch.coordinator_process import reachable_address, spawn_coordinator, stop_process
from .lifetime import die_with_parent
from .liveness_contract import DEFAULT_HEARTBEAT_INTERVAL_S
from .protocol import ProtocolError
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["GenerationError", "ServingOptions", "TrainingInference"]


@dataclass
class ServingOptions:
    """The keyword options of ``TrainingInference`` beyond its named arguments."""

    max_seq_len: int | None = None  # default: the model's max_position_embeddings
    prefix_caching: bool = True  # blocks are keyed by weight version: never stale
    kv_block_size: int = DEFAULT_BLOCK_SIZE
    deterministic_mode: bool = False
    port: int | None = None  # the coordinator's (None: any free one)
    coordinator_host: str = "127.0.0.1"
    coordinator_options: dict[str, Any] = field(default_factory=dict)
    idle_timeout_s: float = 1.0
    heartbeat_interval_s: float | None = DEFAULT_HEARTBEAT_INTERVAL_S
    max_step_s: float = DEFAULT_MAX_STEP_S
    auth_keys: str | None = None
    timeout_s: float = 120.0  # start, suspend, resume and stop each take at most this
    # replicas="tcp://...": WeightSender options (store_host, bucket_bytes, backend, ...).
    sender_options: dict[str, Any] = field(default_factory=dict)


def _check_version(version: Any, mode: Any) -> None:
    if not isinstance(version, str) or not 0 < len(version) <= MAX_VERSION_CHARS:
        raise ValueError(f"version must be a string of 1 to {MAX_VERSION_CHARS} characters")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")


def wire_params(sampling_params: SamplingParams | dict | None) -> dict[str, Any]:
    """The wire dict of ``sampling_params`` (None: the defaults), checked: ValueError names a
    bad field."""
    if sampling_params is None:
        return SamplingParams().serialize()
    if isinstance(sampling_params, SamplingParams):
        return sampling_params.serialize()
    if not isinstance(sampling_params, dict):
        raise TypeError("sampling_params must be a SamplingParams, a dict or None")
    try:
        return SamplingParams.deserialize(dict(sampling_params)).serialize()
    except (ProtocolError, TypeError) as exc:
        raise ValueError(f"bad sampling_params: {exc}") from None


class TrainingInference:
    """In-process serving for a training script (see the module docstring for the rules)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        tensor_parallel_size: int = 1,
        *,
        weights_version: str = "0",
        max_batch_size: int = 8,
        kv_cache_tokens: int | None = None,
        replicas: str | None = None,
        **options: Any,
    ) -> None:
        self.options = ServingOptions(**options)
        if replicas is not None and not (isinstance(replicas, str) and "://" in replicas):
            raise ValueError(f"replicas must be None or a coordinator address, not {replicas!r}")
        _check_version(weights_version, "keep")
        if kv_cache_tokens is not None and kv_cache_tokens < 1:
            raise ValueError("kv_cache_tokens must be >= 1")
        if "TORCHELASTIC_RUN_ID" in os.environ:
            die_with_parent(signal.SIGKILL)  # as a launch's worker: never outlive torchrun
        self.model = model
        self._closed = False
        self._suspended = False
        self.coordinator: Any = None
        self._client: ClientThread | None = None
        self._serving: ServingThread | None = None
        self.server: EngineServer | None = None
        self.engine: InferenceEngine | None = None
        self._remote: RemoteReplicas | None = None
        self._version = weights_version  # remote: the last version this world published
        self._layout = serving_layout(model, tensor_parallel_size)
        self.state = self._layout.state
        atexit.register(self._abandon)
        try:
            if replicas is None:
                self._start(tokenizer, weights_version, max_batch_size, kv_cache_tokens)
            else:
                self._join(replicas)
        except BaseException:
            self._abandon()
            raise

    # ----------------------------------------------------------------- start
    def _agree(self, error: BaseException | None, what: str) -> None:
        """Raise on every rank if ``error`` happened on any (collective)."""
        errors = gather(None if error is None else repr(error), self._layout.control)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if error is not None:
            raise error
        if failed:
            rank, message = failed[0]
            raise RuntimeError(f"{what} failed on rank {rank}: {message}")

    def _start(
        self, tokenizer: Any, version: str, max_batch_size: int, kv_cache_tokens: int | None
    ) -> None:
        options, state = self.options, self.state
        address: Any = None
        if state.rank == 0:
            try:
                coordinator_options = {"host": options.coordinator_host}
                if options.auth_keys is not None:
                    coordinator_options["auth_keys"] = options.auth_keys
                coordinator_options.update(options.coordinator_options)
                self.coordinator, address, self._ready = spawn_coordinator(
                    state.data_parallel_size,
                    tokenizer,
                    options.port,
                    options.deterministic_mode,
                    coordinator_options,
                    import_main=False,  # the training script need not guard its main
                )
                address = reachable_address(address, os.environ.get("MASTER_ADDR", "127.0.0.1"))
            except Exception as exc:  # noqa: BLE001 - every rank raises it
                address = exc
        address = share(address, self._layout.control)
        if isinstance(address, Exception):
            raise RuntimeError(f"rank 0 could not start the coordinator: {address}")
        self.coordinator_address: str = address
        error = None
        try:
            kv_blocks = None
            if kv_cache_tokens is not None:
                kv_blocks = -(-kv_cache_tokens // options.kv_block_size)
            self.engine = InferenceEngine(
                self.model,
                max_batch_size=max_batch_size,
                max_seq_len=options.max_seq_len,
                data_parallel_rank=state.dp_rank,
                prefix_caching=options.prefix_caching,
                kv_block_size=options.kv_block_size,
                kv_blocks=kv_blocks,
                weight_version=version,
            )
        except Exception as exc:  # noqa: BLE001 - every rank raises
            error = exc
        self._agree(error, "building the engine")
        coordinator = self.coordinator
        self.server = EngineServer(  # collective: its step guard's group
            self.engine,
            state,
            address if state.is_tp_coordinator else None,
            deterministic_mode=options.deterministic_mode,
            idle_timeout_s=options.idle_timeout_s,
            coordinator_alive=coordinator.is_alive if coordinator is not None else None,
            heartbeat_interval_s=options.heartbeat_interval_s,
            max_step_s=options.max_step_s,
            auth_keys=options.auth_keys,
        )
        self._serving = ServingThread(self.server, self.model.tp, state.tp_group)
        self._serving.start()
        error = None
        if state.rank == 0 and not self._ready.wait(options.timeout_s):
            error = TimeoutError(f"the replicas did not register within {options.timeout_s} s")
        self._agree(error, "registering the replicas")
        try:
            self._client = ClientThread(
                address, connect_timeout_s=options.timeout_s, auth_keys=options.auth_keys
            )
        except Exception as exc:  # noqa: BLE001 - every rank raises
            error = exc
        self._agree(error, "connecting a client")

    def _join(self, address: str) -> None:
        """Remote replicas: every rank a client of that coordinator; rank 0 the sender."""
        self.coordinator_address = address
        error = None
        try:
            options = self.options
            self._remote = RemoteReplicas(
                self.model, self.state.rank, self._layout.control, options.sender_options
            )
            self._client = ClientThread(
                address, connect_timeout_s=options.timeout_s, auth_keys=options.auth_keys
            )
        except Exception as exc:  # noqa: BLE001 - every rank raises
            error = exc
        self._agree(error, "connecting to the replicas")

    # ----------------------------------------------------------------- state
    @property
    def weight_version(self) -> str:
        """The version of the weights this rank's replica serves (remote: the version this
        world published last)."""
        return self._version if self.engine is None else self.engine.weight_version

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache this rank holds now (0 while suspended; 0 for remote replicas)."""
        return 0 if self.engine is None else self.engine.kv_bytes

    @property
    def suspended(self) -> bool:
        return self._suspended

    @property
    def data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def stats(self) -> dict[str, Any]:
        """The coordinator's STATS: its engines (alive, load, weight version), requests."""
        self._check_open()
        return self._client.do(lambda client: client.stats())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this TrainingInference was shut down")
        if self._serving is not None:
            self._serving.check()

    def _check_serving(self) -> None:
        """While generate() waits: raise if the serving loop failed or ended."""
        if self._serving is None:
            return  # remote: the client's own timeouts and reconnection apply
        self._serving.check()
        if not self._serving.alive:
            raise RuntimeError("the serving loop ended (the coordinator stopped or was lost)")

    # ----------------------------------------------------------------- generating
    def generate(
        self, prompts: list[str | list[int]], sampling_params: SamplingParams | dict | None = None
    ) -> list[dict[str, Any]]:
        """One finished record per prompt, in order (``generated_tokens``, ``generated_text``,
        ``generated_log_probs`` when asked for, ``weight_version_spans``,
        ``kv_version_spans``, ...). Any rank may call it with its own prompts, or rank 0 alone.
        Raises GenerationError (after every prompt ended) if some failed."""
        self._check_open()
        if self._suspended:
            raise RuntimeError("generate() while suspended: call resume() first")
        if not isinstance(prompts, list | tuple):
            raise TypeError("prompts must be a list of strings or token-id lists")
        params = wire_params(sampling_params)
        if not prompts:
            return []
        return self._client.generate(list(prompts), params, self._check_serving)

    # ----------------------------------------------------------------- suspend / update / resume
    def suspend(self) -> None:
        """Park serving and free the KV cache (collective: every rank calls it). Returns once
        this rank's serving thread is parked: no serving collective runs until ``resume``."""
        self._check_open()
        if self._suspended:
            return
        serving = self._serving
        if serving is None:  # remote: nothing of this world's to free
            gather(None, self._layout.control)
            self._suspended = True
            return
        serving.request_park()
        gather(None, self._layout.control)  # every rank's generate() has returned
        if self.state.rank == 0:
            self._client.do(lambda client: client.suspend_engines())
        serving.wait_until(lambda: serving.parked, "suspending", self.options.timeout_s)
        self._suspended = True

    def resume(self) -> None:
        """Serve again (collective: every rank calls it); returns once this rank's engine has
        its KV cache back and runs."""
        self._check_open()
        if not self._suspended:
            return
        serving = self._serving
        if serving is None:
            self._suspended = False
            return
        serving.unpark()
        if self.state.rank == 0:
            self._client.do(lambda client: client.resume_engines())
        engine = self.engine
        serving.wait_until(lambda: not engine.suspended, "resuming", self.options.timeout_s)
        self._suspended = False

    def update_weights(self, version: str, mode: str = "keep") -> dict[str, Any]:
        """Every replica now serves the model's current parameters as ``version`` (collective:
        every rank calls it, after its optimizer step). In place, zero copy. ``mode``: what
        requests in flight do (``keep``, ``abort``, ``recompute``). Returns this rank's
        UPDATE_WEIGHTS_DONE-shaped result once every replica has the version; RuntimeError
        on every rank if any replica failed."""
        self._check_open()
        _check_version(version, mode)
        if self._remote is not None:
            gather(None, self._layout.control)  # every rank's optimizer step is done
            result = self._remote.update(self._client, version, mode, self.options.timeout_s)
            self._version = version
            return result
        around = not self._suspended
        if around:
            self.suspend()
        try:
            server = self.server
            result = self._serving.while_parked(lambda: server.update_in_place(version, mode))
            outcomes = gather((result["ok"], result.get("error")), self._layout.control)
        finally:
            if around:
                self.resume()
        failed = [(rank, error) for rank, (ok, error) in enumerate(outcomes) if not ok]
        if failed:
            rank, error = failed[0]
            raise RuntimeError(f"the update to {version!r} failed on rank {rank}: {error}")
        return result

    # ----------------------------------------------------------------- ending
    def __enter__(self) -> TrainingInference:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown()
        else:
            self._abandon()

    def shutdown(self) -> None:
        """End serving on every rank (collective) and the coordinator process; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._abandon)
        serving, timeout = self._serving, self.options.timeout_s
        if serving is None:  # remote: the replicas are not this world's to stop
            try:
                gather(None, self._layout.control)
            finally:
                self._teardown(coordinator_grace_s=0.0)
            destroy(self._layout.control)
            return
        try:
            gather(None, self._layout.control)  # nobody generates any more
            serving.unpark(closing=True)
            if self.state.rank == 0 and serving.alive:
                self._client.do(lambda client: client.stop_engines(), timeout)
            if not serving.join(timeout):
                self.server.request_shutdown()
                serving.join(5.0)
            gather(None, self._layout.control)  # every serving loop has ended
        finally:
            self._teardown(coordinator_grace_s=10.0)
        destroy(self.server.guard.group, self.state.tp_group, self._layout.control)

    def _teardown(self, coordinator_grace_s: float) -> None:
        if self._client is not None:
            self._client.close()
        # A loop still running owns its sockets (ZMQ's are one thread's): left to the exit.
        serving = self._serving
        if self.server is not None and (serving is None or not serving.alive or serving.parked):
            self.server.close()
        if self.coordinator is not None:
            stop_process(self.coordinator, coordinator_grace_s)
            self.coordinator = None

    def _abandon(self) -> None:
        """This rank's part ends now, alone (an exception, or exit without shutdown): no
        collective; a parked loop stays parked, a running one is asked to end."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._abandon)
        if self._serving is not None and not self._serving.parked and self.server is not None:
            self.server.request_shutdown()
        try:
            self._teardown(coordinator_grace_s=0.5)
        except Exception:  # noqa: BLE001 - already on the way out
            log.exception("rank %d: tearing down", self.state.rank)
