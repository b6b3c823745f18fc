"""``python -m megatron_coord.serving`` (or ``megatron-coord-http``): the OpenAI-compatible front
end on its own, against a running coordinator."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading

from ..exit_codes import HELP_EPILOG, OK, ConfigurationError, run_main
from ..protocol import DEFAULT_MAX_MESSAGE_BYTES
from .runner import cli_app_inputs, serve_http
from .state import DEFAULT_MODEL_NAME
from .workers import HTTPWorkerPool, worker_count


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_coord.serving",
        description="OpenAI-compatible HTTP front end for a running megatron_coord coordinator.",
        epilog=HELP_EPILOG,
    )
    parser.add_argument(
        "--coordinator-address",
        required=True,
        help="ZMQ address of the coordinator, e.g. tcp://127.0.0.1:5555",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="checkpoint directory whose tokenizer gives the chat template and end-of-text id, "
        "or 'gpt2' for the bundled GPT-2 BPE; default: none (the coordinator tokenizes, chat "
        "uses the default template)",
    )
    parser.add_argument(
        "--model-name", default=DEFAULT_MODEL_NAME, help="the model id clients must send"
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=None,
        help="answer 429 above this many running requests (default: no limit)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="abort and answer 504 after this many seconds (default 600; 0: never)",
    )
    parser.add_argument(
        "--default-chat-max-tokens",
        type=int,
        default=256,
        help="max_tokens of chat requests that give none (default 256)",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="refuse requests asking for more new tokens (default: no limit here)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="the model's context: a prompt plus max_tokens past it gets 400 (default: the "
        "--tokenizer checkpoint's max_position_embeddings; none: the engine decides)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MEGATRON_COORD_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (/health and /metrics stay open); "
        "default: $MEGATRON_COORD_API_KEY, else no key",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help=f"refuse request bodies above this size with 413 (default {DEFAULT_MAX_MESSAGE_BYTES})",
    )
    parser.add_argument(
        "--http-workers",
        default="1",
        help="HTTP worker processes sharing the port (SO_REUSEPORT), each with its own "
        "coordinator connection; a dead one is restarted, /metrics sums them all; 'auto': one "
        "per core (default 1: this process serves)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default warning)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: see megatron_coord.exit_codes (each in --help)."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    return run_main(lambda: _serve(args))


def _serve(args: argparse.Namespace) -> int:
    workers = worker_count(args.http_workers)
    if workers > 1:
        return _serve_workers(args, workers)
    try:
        tokenizer, options = cli_app_inputs(args.tokenizer, _server_options(args))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot load the tokenizer {args.tokenizer!r}: {exc}") from None
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after shutting down
        serve_http(args.coordinator_address, tokenizer=tokenizer, **options)
    return OK


def _server_options(args: argparse.Namespace) -> dict:
    """The HTTP server's options from the command line: the same for one server and a pool."""
    return {
        "model_name": args.model_name,
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "max_concurrent_requests": args.max_concurrent_requests,
        "request_timeout_s": args.request_timeout or None,
        "default_chat_max_tokens": args.default_chat_max_tokens,
        "max_tokens_limit": args.max_tokens_limit,
        "max_model_len": args.max_model_len,
        "api_key": args.api_key,
        "max_body_bytes": args.max_body_bytes,
    }


def _serve_workers(args: argparse.Namespace, workers: int) -> int:
    """``--http-workers N``: this process supervises N workers until SIGTERM/SIGINT."""
    pool = HTTPWorkerPool(
        args.coordinator_address,
        workers,
        tokenizer=args.tokenizer,
        **_server_options(args),
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    pool.start()
    print(f"serving on {pool.url} with {workers} HTTP workers", flush=True)
    stop.wait()
    pool.stop()
    return OK
