"""The command-line options of a launch (launch/generate.py, launch/serve.py), and the
ReplicaOptions they make."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..coordinator.liveness import DEFAULT_ENGINE_TIMEOUT_S
from ..coordinator.options import DEFAULT_FAILOVER_WAIT_S
from ..coordinator.routing import add_prefix_routing_arguments, prefix_routing_options
from ..coordinator.shutdown import DEFAULT_SHUTDOWN_GRACE_S, STOP_ROUND_S
from ..engine.engine import INITIAL_VERSION
from ..engine.kv_blocks import DEFAULT_BLOCK_SIZE
from ..engine.step_guard import DEFAULT_MAX_STEP_FAILURES
from ..engine.step_heartbeat import DEFAULT_MAX_STEP_S
from ..liveness_contract import DEFAULT_HEARTBEAT_INTERVAL_S, ENGINE_BEATS_PER_TIMEOUT
from .replica import DRAIN_MARGIN_S, ReplicaOptions


def _version_label(text: str) -> str:
    """A weight version label: 1 to 128 characters (what an update's label may be)."""
    if not 0 < len(text) <= 128:
        raise argparse.ArgumentTypeError("a version label has 1 to 128 characters")
    return text


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
        "--weights-version",
        default=INITIAL_VERSION,
        type=_version_label,
        metavar="LABEL",
        help="the version label of the weights loaded at start, which records' "
        "weight_version_spans name until a weight update gives the next one (default "
        f"{INITIAL_VERSION!r})",
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
        "steps too, at least every quarter of it, so this need not exceed the step time",
    )
    parser.add_argument(
        "--failover-wait",
        type=float,
        default=DEFAULT_FAILOVER_WAIT_S,
        help="seconds the requests of a dead replica wait for another when none is left, or "
        "(streams under way) for it to come back "
        f"(default {DEFAULT_FAILOVER_WAIT_S:g}; 0: fail them at once)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=None,
        help="seconds between a replica's heartbeats, also while a step runs. Default: "
        f"{DEFAULT_HEARTBEAT_INTERVAL_S:g}, or faster if the coordinator's engine timeout "
        f"asks for it (1/{ENGINE_BEATS_PER_TIMEOUT} of it). Set, it is kept: a coordinator "
        "whose engine timeout needs faster heartbeats refuses the replica (exit 2), naming both",
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
        heartbeat_interval_s=(
            DEFAULT_HEARTBEAT_INTERVAL_S
            if args.heartbeat_interval is None
            else args.heartbeat_interval
        ),
        heartbeat_interval_fixed=args.heartbeat_interval is not None,
        max_step_s=args.max_step_time,
        max_step_failures=args.max_step_failures,
        shutdown_grace_s=args.shutdown_grace,
        auth_keys=args.auth_keys,
        weights_version=args.weights_version,
    )
