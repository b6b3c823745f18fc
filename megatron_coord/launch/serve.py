r"""Serve a model with N data-parallel replicas of T tensor-parallel ranks until a client STOPs.

    torchrun --nproc-per-node N launch/serve.py [--model DIR] --tensor-parallel-size T \
        [--port 5555] [--deterministic-mode] [--http-port 8000]

Global rank 0 spawns the coordinator on 127.0.0.1:PORT (any free port for --port 0 or none; a
PORT that cannot be bound ends the launch with exit code 2 and a line naming what holds it) and
prints its address; once every replica has registered it prints a ``ready:`` line (and writes
--ready-file); clients (megatron_coord.InferenceClient, or Megatron-core's)
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
replica that dies fails alone and a restarted job joins again. A joined replica says it is
waiting until the coordinator has answered it, then that it joined; with no answer within
--join-timeout seconds it exits 3. One that hears nothing from the coordinator for
--coordinator-timeout seconds registers again (a restarted coordinator gets it back), or with
--no-coordinator-reconnect exits 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from functools import partial
from typing import TYPE_CHECKING

from ..engine.coordinator_link import DEFAULT_JOIN_TIMEOUT_S
from ..exit_codes import HELP_EPILOG, OK, run_main
from ..files import write_atomically
from .arguments import add_replica_arguments, options_from_args
from .coordinator_process import COORDINATOR_START_TIMEOUT_S
from .replica import Replica

if TYPE_CHECKING:
    from ..serving import HTTPServerProcess, HTTPWorkerPool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_replica_arguments(parser)
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="coordinator port; taken: exit 2 (default, or 0: any free port, printed)",
    )
    parser.add_argument(
        "--address-file", help="also write the coordinator's address to this file (rank 0)"
    )
    parser.add_argument(
        "--ready-file",
        help="rank 0 writes the coordinator's address here once every replica of the launch "
        "has registered (joined: once rank 0's replica has joined), for scripts to wait on",
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
        "it is lost (default 10)",
    )
    parser.add_argument(
        "--join-timeout",
        type=float,
        default=DEFAULT_JOIN_TIMEOUT_S,
        help="with --coordinator-address: seconds a replica waits for the coordinator to "
        "answer its registration (and each re-registration) before it exits 3 "
        f"(default {DEFAULT_JOIN_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--coordinator-reconnect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --coordinator-address: when the coordinator is lost, keep trying to register "
        "again, listing the requests held (the same coordinator keeps those it still waits "
        "for; a restarted one at the same address gets the replicas back, without them) "
        "instead of exiting",
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
        "--http-workers",
        default="1",
        help="HTTP worker processes sharing --http-port (SO_REUSEPORT), each with its own "
        "coordinator connection; a dead one is restarted, /metrics sums them all; 'auto': one "
        "per core (default 1)",
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


def start_http(replica: Replica, args: argparse.Namespace) -> HTTPServerProcess | HTTPWorkerPool:
    """Rank 0: the HTTP front end in a process of its own (it never takes the GIL from this
    rank's engine loop), or ``--http-workers N`` of them supervised from a thread here. It
    serves at once (/health/live) and connects in the background: the coordinator answers
    once every engine has registered (/health/ready)."""
    from ..serving import HTTPServerProcess, HTTPWorkerPool, worker_count
    from .replica import DRAIN_MARGIN_S

    name = args.served_model_name or (
        os.path.basename(os.path.normpath(args.model)) if args.model else "megatron_coord-default"
    )
    workers = worker_count(args.http_workers)
    server = HTTPServerProcess if workers == 1 else partial(HTTPWorkerPool, workers=workers)
    http = server(
        replica.address,
        tokenizer=replica.model_path,
        model_name=name,
        host=args.http_host,
        port=args.http_port,
        connect_timeout_s=COORDINATOR_START_TIMEOUT_S,
        wait_for_coordinator=False,  # live at once; /health/ready once the replicas are in
        # In flight at a SIGTERM: answered within the drain (a result, or shutting_down).
        graceful_shutdown_s=replica.options.drain_s() + DRAIN_MARGIN_S,
        api_key=args.api_key or os.environ.get("MEGATRON_COORD_API_KEY"),
    ).start()
    count = f", {workers} HTTP workers" if workers > 1 else ""
    print(f"OpenAI-compatible API at {http.url}/v1 (model {name!r}{count})", flush=True)
    return http


def main(argv: list[str] | None = None) -> int:
    """Exit codes: see megatron_coord.exit_codes (each in --help)."""
    args = parse_args(argv)
    return run_main(lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    options = options_from_args(args, port=args.port)
    if args.port is not None:
        options.coordinator_options["strict_port"] = True  # the user's port, or exit 2
    options.coordinator_address = args.coordinator_address
    options.coordinator_timeout_s = args.coordinator_timeout
    options.coordinator_reconnect = args.coordinator_reconnect
    options.join_timeout_s = args.join_timeout
    replica = Replica(options)
    if args.coordinator_address is not None:
        _announce_joins(replica, args.ready_file)
    elif replica.is_global_rank0:
        if args.address_file:  # first: whoever read the line below finds the file
            write_atomically(args.address_file, replica.address)
        print(f"coordinator listening at {replica.address}", flush=True)
        _announce_ready(replica, args.ready_file)
    http = None
    try:
        if replica.is_global_rank0 and args.http_port is not None:
            http = start_http(replica, args)
        replica.serve()
    finally:
        if http is not None:
            http.stop()
        replica.shutdown()  # after serve() a no-op; after a failed start, the cleanup
    return OK


def _announce_joins(replica: Replica, ready_file: str | None) -> None:
    """Joined replicas: say they wait, and say they joined only once the coordinator has
    answered (each time: a replica that registers again after a loss says so again)."""
    if not replica.state.is_tp_coordinator:
        return
    dp_rank = replica.state.dp_rank
    print(f"replica {dp_rank}: waiting for the coordinator at {replica.address}", flush=True)

    def joined() -> None:
        print(f"replica {dp_rank} joined the coordinator at {replica.address}", flush=True)
        if ready_file and replica.is_global_rank0:
            write_atomically(ready_file, replica.address)

    replica.server.link.on_joined = joined


def _announce_ready(replica: Replica, ready_file: str | None) -> None:
    """Rank 0 with its own coordinator: a ``ready:`` line (and the ready file) once every
    replica has registered, from a thread (the main thread runs the engine loop)."""

    def wait() -> None:
        if not replica.ready_event.wait(COORDINATOR_START_TIMEOUT_S):
            return  # the replicas never all registered: the launch fails its own way
        count = replica.state.data_parallel_size
        print(f"ready: {count} replica(s) registered at {replica.address}", flush=True)
        if ready_file:
            write_atomically(ready_file, replica.address)

    threading.Thread(target=wait, name="ready-announcer", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
