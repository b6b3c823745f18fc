"""torchrun wiring: parallel state, the coordinator process, one engine server per rank.

Global rank 0 spawns the coordinator (``DataParallelInferenceCoordinator.entrypoint`` in a
``multiprocessing`` 'spawn' process, a Pipe for its bound address, an Event for readiness) and
shares the address with every rank through torch.distributed. Each rank loads its shard of the
model; the TP-coordinator of each replica connects and registers. ``Replica.serve()`` runs the
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

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .. import parallel_state
from ..coordinator.coordinator import DEFAULT_FAILOVER_WAIT_S
from ..coordinator.liveness import DEFAULT_ENGINE_TIMEOUT_S
from ..coordinator.routing import add_prefix_routing_arguments, prefix_routing_options
from ..coordinator.shutdown import DEFAULT_SHUTDOWN_GRACE_S, STOP_ROUND_S
from ..engine.coordinator_link import DEFAULT_JOIN_TIMEOUT_S, joined_identity
from ..engine.engine import InferenceEngine
from ..engine.kv_blocks import DEFAULT_BLOCK_SIZE
from ..engine.server import EngineServer
from ..engine.step_guard import DEFAULT_MAX_STEP_FAILURES
from ..engine.step_heartbeat import DEFAULT_MAX_STEP_S
from ..exit_codes import CONFIG_ERROR, ConfigurationError, PeerLostError
from ..lifetime import die_with_parent, warn_unless_main_thread
from ..parallel_state import ParallelState

log = logging.getLogger(__name__)

COORDINATOR_START_TIMEOUT_S = 120.0
# A draining rank waits this much past the grace and the STOP round for its STOP.
DRAIN_MARGIN_S = 2.0


def _coordinator_main(
    pipe_connection: Any,
    ready_event: Any,
    parent_pid: int,
    data_parallel_size: int,
    tokenizer_path: str,
    port: int | None,
    deterministic_mode: bool,
    options: dict[str, Any],
) -> None:
    """Target of the spawned coordinator process: load the tokenizer and serve.

    Rank 0's death sends it SIGHUP, which ``GracefulShutdown`` takes as "fail what is in
    flight and exit now" (until its handlers are installed: the default action, death)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # not ignored, even under nohup
    die_with_parent(signal.SIGHUP, parent_pid)
    # SIGTERM before the coordinator is up ends the process like Ctrl-C would; once it
    # serves, SIGTERM/SIGINT drain (GracefulShutdown).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from ..coordinator.coordinator import DataParallelInferenceCoordinator
    from ..tokenizer import load_tokenizer

    try:
        DataParallelInferenceCoordinator.entrypoint(
            pipe_connection,
            ready_event,
            data_parallel_size,
            load_tokenizer(tokenizer_path),
            port,
            deterministic_mode,
            **options,
        )
    except ConfigurationError as exc:  # before binding: rank 0 reads it instead of an address
        with contextlib.suppress(OSError):
            pipe_connection.send(exc)
        sys.exit(CONFIG_ERROR)


def spawn_coordinator(
    data_parallel_size: int,
    tokenizer_path: str,
    port: int | None = None,
    deterministic_mode: bool = False,
    options: dict[str, Any] | None = None,
) -> tuple[multiprocessing.process.BaseProcess, str, Any]:
    """Start the coordinator process; return (process, address, ready_event).

    Call it from the main thread: the child dies with the thread that started it."""
    warn_unless_main_thread("the coordinator process")
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    ready = ctx.Event()
    process = ctx.Process(
        target=_coordinator_main,
        args=(
            child_end,
            ready,
            os.getpid(),
            data_parallel_size,
            tokenizer_path,
            port,
            deterministic_mode,
            dict(options or {}),
        ),
        name="megatron-coord-coordinator",
        daemon=True,
    )
    process.start()
    child_end.close()
    if not parent_end.poll(COORDINATOR_START_TIMEOUT_S):
        process.terminate()
        raise RuntimeError("the coordinator did not report its address in time")
    try:
        address = parent_end.recv()
        if isinstance(address, ConfigurationError):  # the child could not bind the port
            process.join(5)
            raise address
    except EOFError:
        process.join(5)
        raise RuntimeError(
            f"the coordinator process exited before binding (exit code {process.exitcode})"
        ) from None
    parent_end.close()
    return process, address, ready


def reachable_address(address: str, host: str) -> str:
    """Replace a wildcard bind address (0.0.0.0, *, ::) with ``host``, which peers can dial."""
    prefix, _, port = address.rpartition(":")
    scheme, _, bound = prefix.partition("://")
    if bound.strip("[]") in ("0.0.0.0", "*", "::"):
        return f"{scheme}://{host}:{port}"
    return address


def stop_process(process: multiprocessing.process.BaseProcess, grace_s: float = 10.0) -> None:
    """Join a child; SIGTERM it after ``grace_s``, SIGKILL if that does not end it."""
    process.join(grace_s)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join()


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
    heartbeat_interval_s: float | None = 1.0
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
        )
        self.server = EngineServer(
            self.engine,
            self.state,
            self.address if self.state.is_tp_coordinator else None,
            deterministic_mode=options.deterministic_mode,
            idle_timeout_s=options.idle_timeout_s,
            coordinator_alive=self.coordinator.is_alive if self.coordinator is not None else None,
            heartbeat_interval_s=options.heartbeat_interval_s,
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
        if self.server.coordinator_lost:
            # A non-zero exit makes torchrun end the other replicas too.
            raise PeerLostError(self.server.lost_reason or "the coordinator was lost")

    def shutdown(self) -> None:
        """Close sockets, end the coordinator process (rank 0), leave the process group."""
        self.server.close()
        # After a STOP round trip (a client's, or the drain's) the coordinator exits by itself;
        # else (a second signal, a drain that never ended) it gets SIGTERM.
        self._abandon(10.0 if self.server.stop_received else 0.5)


# ---------------------------------------------------------------------- launch scripts


def add_replica_arguments(parser: Any) -> None:
    """The model and parallelism options shared by launch/generate.py and launch/serve.py."""
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face Llama checkpoint directory (config.json, *.safetensors, tokenizer). "
        "Default: the embedded small seeded-random Llama with the GPT-2 tokenizer, written once "
        "to $MEGATRON_COORD_CACHE or ~/.cache/megatron_coord.",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="ranks per model replica (contiguous ranks form a TP group); the world size must "
        "be a multiple of it, and world / T replicas serve in data parallel (default 1)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="requests decoded together per replica (default 8)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="prompt + generated tokens per request (default: the model's max positions)",
    )
    parser.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="recompute every prompt: do not keep computed KV blocks for later prompts that "
        "start with the same tokens (prefix caching is on by default)",
    )
    parser.add_argument(
        "--kv-block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"token positions per KV-cache block, the unit of prefix reuse (default "
        f"{DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="KV-cache blocks per replica, the bound on its KV memory, cached prefixes "
        "included (default: max-batch-size x max-seq-len positions)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weight and activation dtype (default float32)",
    )
    parser.add_argument(
        "--coordinator-host",
        default="127.0.0.1",
        help="interface the coordinator binds on global rank 0 (default 127.0.0.1). For a "
        "multi-node launch use 0.0.0.0: the ranks then dial rank 0's MASTER_ADDR",
    )
    parser.add_argument(
        "--routing",
        choices=["round_robin", "least_loaded", "prefix_aware"],
        default="round_robin",
        help="how the coordinator picks a replica per request: round_robin (default), "
        "least_loaded (the least outstanding work in tokens; in --deterministic-mode it "
        "balances the cumulative routed work, a pure function of the request sequence) or "
        "prefix_aware (the replica caching the longest prefix of the prompt, unless "
        "--prefix-load-factor says it is too loaded; else least_loaded)",
    )
    add_prefix_routing_arguments(parser)
    parser.add_argument(
        "--auth-keys",
        default=None,
        help="CURVE key directory (python -m megatron_coord.auth generate DIR): the coordinator "
        "admits only holders of an authorized key, and the engines use one",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --coordinator-host without --auth-keys (anyone who reaches "
        "the port can use and stop the service)",
    )
    parser.add_argument(
        "--engine-timeout",
        type=float,
        default=DEFAULT_ENGINE_TIMEOUT_S,
        help="seconds without a message after which the coordinator this launch spawns declares "
        f"a replica dead (default {DEFAULT_ENGINE_TIMEOUT_S:g}); replicas heartbeat during long "
        "steps too, so this need not exceed the step time",
    )
    parser.add_argument(
        "--failover-wait",
        type=float,
        default=DEFAULT_FAILOVER_WAIT_S,
        help="seconds the requests of a dead replica wait for another when none is left "
        f"(default {DEFAULT_FAILOVER_WAIT_S:g}; 0: fail them at once)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        help="seconds between a replica's heartbeats, also while a step runs (default 1)",
    )
    parser.add_argument(
        "--max-step-time",
        type=float,
        default=DEFAULT_MAX_STEP_S,
        help="a step running longer than this many seconds is a hang: the replica stops "
        "heartbeating and is declared dead an engine timeout later "
        f"(default {DEFAULT_MAX_STEP_S:g})",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE_S,
        help="on SIGTERM/SIGINT (torchrun forwards them) new requests are refused with "
        "shutting_down and those in flight get this many seconds to finish before they fail "
        f"with shutting_down; then every process exits (default {DEFAULT_SHUTDOWN_GRACE_S:g}). "
        f"Keep it plus {STOP_ROUND_S + DRAIN_MARGIN_S:g} s under torchrun's --shutdown-timeout "
        "(30 s by default), after which torchrun SIGKILLs the workers",
    )
    parser.add_argument(
        "--max-step-failures",
        type=int,
        default=DEFAULT_MAX_STEP_FAILURES,
        help="a model step that raises fails its batch's requests (engine_failed) and the "
        "replica serves on; after this many failed steps in a row it reports itself "
        "unhealthy and gets no new requests until a step succeeds again "
        f"(default {DEFAULT_MAX_STEP_FAILURES}; 0: never unhealthy)",
    )
    parser.add_argument(
        "--deterministic-mode",
        action="store_true",
        help="requests without a seed sample with one derived from their prompt, so the same "
        "prompt gives the same tokens on every run and every replica",
    )


def options_from_args(args: Any, port: int | None = None) -> ReplicaOptions:
    """ReplicaOptions from parsed add_replica_arguments options."""
    return ReplicaOptions(
        model=args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        prefix_caching=args.prefix_caching,
        kv_block_size=args.kv_block_size,
        kv_blocks=args.kv_blocks,
        port=port,
        deterministic_mode=args.deterministic_mode,
        dtype=getattr(torch, args.dtype),
        coordinator_host=args.coordinator_host,
        coordinator_options={
            "routing": args.routing,
            **prefix_routing_options(args),
            "insecure_no_auth": args.insecure_no_auth,
            "engine_timeout": args.engine_timeout,
            "failover_wait": args.failover_wait,
        },
        heartbeat_interval_s=args.heartbeat_interval,
        max_step_s=args.max_step_time,
        max_step_failures=args.max_step_failures,
        shutdown_grace_s=args.shutdown_grace,
        auth_keys=args.auth_keys,
    )


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """``--prompt`` values, then the file's: a JSON list of strings, or one prompt per line."""
    import json

    out = list(prompts or [])
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            loaded = json.loads(text)
            if not all(isinstance(p, str) for p in loaded):
                raise ValueError(f"{prompts_file}: a JSON prompts file must be a list of strings")
            out += loaded
        else:
            out += [line for line in text.splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts: pass --prompt TEXT and/or --prompts-file FILE")
    return out


async def _generate_async(
    address: str, prompts: list[str], params: Any, progress: bool
) -> list[dict[str, Any]]:
    import asyncio

    from tqdm import tqdm

    from ..client import InferenceClient

    client = InferenceClient(address)
    await client.start()
    try:
        futures = [client.add_request(prompt, params) for prompt in prompts]
        with tqdm(total=len(futures), disable=not progress, unit="prompt") as bar:
            for done in asyncio.as_completed(futures):
                with contextlib.suppress(Exception):  # reported per prompt below
                    await done
                bar.update()
        return [f.exception() if f.exception() is not None else f.result() for f in futures]
    finally:
        await client.stop_engines()
        client.stop()


def _completion(prompt: str, record: dict[str, Any] | BaseException) -> dict[str, Any]:
    """One output entry: the record's fields, or the error that prompt got instead."""
    if isinstance(record, BaseException):
        return {"prompt": prompt, "error": str(record)}
    request = record["requests"][0] if "requests" in record else record
    out = {
        "prompt": prompt,
        "prompt_tokens": request["prompt_tokens"],
        "generated_text": request.get("generated_text"),
        "generated_tokens": request["generated_tokens"],
        "data_parallel_rank": request.get("data_parallel_rank"),
        "finish_reason": request.get("finish_reason"),
    }
    if request.get("generated_log_probs") is not None:
        out["generated_log_probs"] = request["generated_log_probs"]
    return out


def run_generate(
    options: ReplicaOptions,
    prompts: list[str],
    sampling_params: Any,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Serve ``prompts`` through the coordinator; rank 0 returns completions in prompt order.

    Rank 0 runs a client in a thread (the main thread runs its engine), submits every prompt,
    gathers the results and sends STOP, which ends every rank's loop and the coordinator.
    Other ranks return None.
    """
    import asyncio
    import threading

    replica = Replica(options)
    results: dict[str, Any] = {}

    def client_thread() -> None:
        try:
            if not replica.ready_event.wait(COORDINATOR_START_TIMEOUT_S):
                raise RuntimeError("the coordinator never became ready")
            records = asyncio.run(
                _generate_async(replica.address, prompts, sampling_params, progress)
            )
            results["completions"] = [
                _completion(p, r) for p, r in zip(prompts, records, strict=True)
            ]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            results["error"] = exc
            replica.server.request_shutdown()

    thread = None
    if replica.is_global_rank0:
        thread = threading.Thread(target=client_thread, name="generate-client", daemon=True)
        thread.start()
    replica.serve()
    if thread is None:
        return None
    # After STOP (a client's, or the end of a drain) the client has its answers; after a
    # signal that ended the loop at once it may wait forever on requests the stopped engines
    # will never finish, so give it a moment and leave it (a daemon).
    thread.join(60.0 if replica.server.stop_received else 2.0)
    if thread.is_alive():
        raise RuntimeError("generation interrupted before every prompt completed")
    if "error" in results:
        raise RuntimeError(f"generation failed: {results['error']!r}") from results["error"]
    return results["completions"]
