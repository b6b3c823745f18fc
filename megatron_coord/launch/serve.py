r"""Serve a model with N data-parallel replicas of T tensor-parallel ranks until a client STOPs.

    torchrun --nproc-per-node N launch/serve.py [--model DIR] --tensor-parallel-size T \
        [--port 5555] [--deterministic-mode] [--http-port 8000]

Global rank 0 spawns the coordinator on 127.0.0.1:PORT (a random free port if PORT is taken or
not given) and prints its address; clients (megatron_coord.InferenceClient, or Megatron-core's)
connect there. Every rank serves until a client sends STOP (``await client.stop_engines()``),
or until Ctrl-C / SIGTERM, which drain: new requests are refused with shutting_down, those in
flight get --shutdown-grace seconds to finish (then fail with shutting_down), and every process
exits 0. With --http-port, global rank 0 also serves the OpenAI-compatible HTTP API
(megatron_coord.serving) from a child process; on the signal it stops accepting connections
and lets the HTTP requests in flight end with the drain. If the torchrun agent is killed
(SIGKILL), every process of the launch dies with it within about a second
(megatron_coord.lifetime).

With --coordinator-address tcp://H:P the job spawns no coordinator: its replicas register with
an existing one (``python -m megatron_coord.coordinator --port P``), which outlives them, so a
replica that dies fails alone and a restarted job joins again. A joined replica that hears
nothing from the coordinator for --coordinator-timeout seconds says so and exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .replica import Replica, add_replica_arguments, options_from_args

if TYPE_CHECKING:
    from ..serving import HTTPServerProcess


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_replica_arguments(parser)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: random)")
    parser.add_argument(
        "--address-file", help="also write the coordinator's address to this file (rank 0)"
    )
    parser.add_argument(
        "--coordinator-address",
        default=None,
        help="register this job's replicas with the coordinator at tcp://H:P instead of "
        "spawning one (see python -m megatron_coord.coordinator)",
    )
    parser.add_argument(
        "--coordinator-timeout",
        type=float,
        default=10.0,
        help="with --coordinator-address: seconds of silence from the coordinator after which "
        "the replicas exit non-zero (default 10)",
    )
    parser.add_argument(
        "--coordinator-reconnect",
        action="store_true",
        help="with --coordinator-address: when the coordinator is lost, abort this job's "
        "requests and keep trying to register again (a restarted coordinator at the same "
        "address gets the replicas back) instead of exiting",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics) on this port from global rank 0; 0 picks a free port "
        "(printed). Default: no HTTP",
    )
    parser.add_argument(
        "--http-host", default="127.0.0.1", help="address the HTTP server binds (default 127.0.0.1)"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="HTTP clients must send 'Authorization: Bearer KEY' (default: "
        "$MEGATRON_COORD_API_KEY, else no key)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model id HTTP clients send (default: the checkpoint directory's name, or "
        "'megatron_coord-default' for the embedded model)",
    )
    return parser.parse_args(argv)


def start_http(replica: Replica, args: argparse.Namespace) -> HTTPServerProcess:
    """Rank 0: the HTTP front end in a process of its own (it never takes the GIL from this
    rank's engine loop); it connects once every engine has registered."""
    from ..serving import HTTPServerProcess
    from .replica import COORDINATOR_START_TIMEOUT_S, DRAIN_MARGIN_S

    name = args.served_model_name or (
        os.path.basename(os.path.normpath(args.model)) if args.model else "megatron_coord-default"
    )
    http = HTTPServerProcess(
        replica.address,
        tokenizer=replica.model_path,
        model_name=name,
        host=args.http_host,
        port=args.http_port,
        connect_timeout_s=COORDINATOR_START_TIMEOUT_S,
        # In flight at a SIGTERM: answered within the drain (a result, or shutting_down).
        graceful_shutdown_s=replica.options.drain_s() + DRAIN_MARGIN_S,
        api_key=args.api_key or os.environ.get("MEGATRON_COORD_API_KEY"),
    ).start()
    print(f"OpenAI-compatible API at {http.url}/v1 (model {name!r})", flush=True)
    return http


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = options_from_args(args, port=args.port)
    options.coordinator_address = args.coordinator_address
    options.coordinator_timeout_s = args.coordinator_timeout
    options.coordinator_reconnect = args.coordinator_reconnect
    replica = Replica(options)
    if args.coordinator_address is not None:
        if replica.state.is_tp_coordinator:
            print(
                f"replica {replica.state.dp_rank} joined the coordinator at {replica.address}",
                flush=True,
            )
    elif replica.is_global_rank0:
        print(f"coordinator listening at {replica.address}", flush=True)
        if args.address_file:
            with open(args.address_file + ".tmp", "w") as f:
                f.write(replica.address)
            os.replace(args.address_file + ".tmp", args.address_file)
    serve_http = replica.is_global_rank0 and args.http_port is not None
    http = start_http(replica, args) if serve_http else None
    try:
        replica.serve()
    finally:
        if http is not None:
            http.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
