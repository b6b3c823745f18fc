"""The standalone coordinator: ``python -m megatron_coord.coordinator --port P [--host H] ...``.

Inside one torchrun world the death of any rank ends the whole world, so replicas that must fail
alone run as separate torchrun jobs that register with a coordinator living outside all of them
(``launch/serve.py --coordinator-address tcp://H:P``). This coordinator starts with no engine
(``data_parallel_size=0``): replicas join and leave at any time; a request that arrives while
none is registered waits up to ``--wait-for-engine`` seconds for one, then gets ``no_engine``.
SIGTERM/SIGINT: new requests are refused with ``shutting_down``, those in flight get
``--shutdown-grace`` seconds, then it exits 0. SIGHUP: those in flight fail with
``shutting_down`` at once, and it exits.

``--port P`` is a promise: if P cannot be bound it exits 2 naming what holds it; ``--port 0``
binds any free port, printed (and written to ``--address-file``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..exit_codes import HELP_EPILOG, OK, ConfigurationError, run_main
from ..files import write_atomically
from .liveness import DEFAULT_ENGINE_TIMEOUT_S
from .options import DEFAULT_FAILOVER_WAIT_S, DEFAULT_WAIT_FOR_ENGINE_S
from .routing import POLICIES, add_prefix_routing_arguments, prefix_routing_options

logger = logging.getLogger("megatron_coord.coordinator.standalone")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_coord.coordinator",
        description=__doc__,
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--port", type=int, required=True, help="TCP port to bind (0: any free one, printed)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1). Anything but loopback needs --auth-keys "
        "or --insecure-no-auth",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="checkpoint or tokenizer directory (default: the embedded default model's)",
    )
    parser.add_argument(
        "--routing",
        choices=sorted(POLICIES),
        default="round_robin",
        help="round_robin (default), least_loaded or prefix_aware (see the README)",
    )
    add_prefix_routing_arguments(parser)
    parser.add_argument(
        "--engine-timeout",
        type=float,
        default=DEFAULT_ENGINE_TIMEOUT_S,
        help="seconds without a message after which a heartbeating engine is dead (default 3). "
        "Replicas of ours heartbeat during long model steps too, so this need not exceed the "
        "step time; each is told at registration to beat at least every quarter of it (one "
        "whose --heartbeat-interval is set slower is refused). A replica declared dead that "
        "lives registers again and gets back what it holds",
    )
    parser.add_argument(
        "--failover-wait",
        type=float,
        default=DEFAULT_FAILOVER_WAIT_S,
        help="seconds the requests of a dead replica wait for another when none is left (or, "
        "streams already under way, for that replica to come back), before they fail "
        f"(default {DEFAULT_FAILOVER_WAIT_S:g}; 0: at once)",
    )
    parser.add_argument(
        "--wait-for-engine",
        type=float,
        default=DEFAULT_WAIT_FOR_ENGINE_S,
        help="seconds a request waits for an engine when none is registered (replicas still "
        f"loading) before it fails with no_engine (default {DEFAULT_WAIT_FOR_ENGINE_S:g}; 0: "
        "at once)",
    )
    parser.add_argument("--max-outstanding", type=int, default=None, help="requests in flight")
    parser.add_argument(
        "--max-outstanding-per-engine", type=int, default=None, help="requests per engine"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds after which a request fails with 'timeout' and is aborted (default: none)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds in-flight requests get after SIGTERM/SIGINT (default 10)",
    )
    parser.add_argument(
        "--auth-keys",
        default=None,
        help="CURVE key directory (python -m megatron_coord.auth generate DIR): only clients "
        "and engines holding an authorized key get in",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without authentication (anyone reaching the port "
        "can use and stop the service)",
    )
    parser.add_argument(
        "--megatron-engines",
        choices=["0.16", "0.19"],
        default="0.16",
        help="the Megatron-core version of engines that register with an empty frame (0.16 "
        "and 0.19 register alike; engines of ours say who they are)",
    )
    parser.add_argument("--address-file", default=None, help="also write the bound address here")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def coordinator_options(args: argparse.Namespace) -> dict[str, Any]:
    """Coordinator keyword options from the parsed command line."""
    options: dict[str, Any] = {
        "host": args.host,
        "routing": args.routing,
        **prefix_routing_options(args),
        "engine_timeout": args.engine_timeout,
        "failover_wait": args.failover_wait,
        "wait_for_engine": args.wait_for_engine,
        "strict_port": True,
        "request_timeout": args.request_timeout,
        "shutdown_grace": args.shutdown_grace,
        "auth_keys": args.auth_keys,
        "insecure_no_auth": args.insecure_no_auth,
        "megatron_engines": args.megatron_engines,
    }
    if args.max_outstanding is not None:
        options["max_outstanding"] = args.max_outstanding
    if args.max_outstanding_per_engine is not None:
        options["max_outstanding_per_engine"] = args.max_outstanding_per_engine
    return options


def main(argv: list[str] | None = None) -> int:
    """Exit codes: see megatron_coord.exit_codes (each in --help)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return run_main(lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    from ..auth import check_bind
    from ..tokenizer import load_tokenizer
    from .coordinator import DataParallelInferenceCoordinator

    try:
        check_bind(args.host, args.auth_keys, args.insecure_no_auth)  # before any slow work
        if args.tokenizer is None:
            from ..models.default_model import default_checkpoint_dir

            args.tokenizer = default_checkpoint_dir()
        tokenizer = load_tokenizer(args.tokenizer)
        coordinator = DataParallelInferenceCoordinator(
            None, 0, tokenizer, args.port, **coordinator_options(args)
        )
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise ConfigurationError(str(exc)) from None
    coordinator.install_signal_handlers()
    if args.address_file:  # first: whoever read the line below finds the file
        write_atomically(args.address_file, coordinator.addr)
    print(f"coordinator listening at {coordinator.addr}", flush=True)
    try:
        coordinator.start()
    finally:
        coordinator.stop()
    logger.info("coordinator shut down")
    return OK


if __name__ == "__main__":
    sys.exit(main())
