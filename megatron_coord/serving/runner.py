"""Running the HTTP front end: uvicorn in the foreground, on a thread, or in its own process.

``serve_http`` blocks (the command line uses it); ``HTTPServerThread`` serves from a thread of
this process (tests, embedding); ``HTTPServerProcess`` serves from a spawned process, which is
what ``launch/serve.py --http-port`` uses so the server never competes for the GIL with rank 0's
engine loop. All of them bind the listening socket themselves (port 0 picks a free port).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from ..exit_codes import ConfigurationError, PeerLostError
from ..lifetime import die_with_parent, warn_unless_main_thread
from ..ports import port_in_use_message
from .app import create_app
from .state import DEFAULT_MODEL_NAME, check_options

log = logging.getLogger(__name__)


def bind_socket(
    host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A listening TCP socket (port 0: a free one); its port is ``getsockname()[1]``. A port
    that cannot be bound raises ConfigurationError naming what holds it.

    ``reuse_port``: SO_REUSEPORT, so several HTTP workers listen on one port and the kernel
    spreads new connections over them; ``listen=False`` only holds the port (the workers'
    supervisor keeps it that way, so a port 0 choice stays theirs)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and accepted sockets inherit it. With proto 0, each keep-alive response waits ~40 ms for
    # Nagle and the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(port_in_use_message(host, port)) from None
        raise ConfigurationError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    if listen:
        sock.listen(2048)
    sock.setblocking(False)
    return sock


def _url(host: str, port: int) -> str:
    """The base URL of a server bound to ``host:port`` (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


DEFAULT_GRACEFUL_SHUTDOWN_S = 5.0


def _uvicorn_server(
    app: FastAPI,
    log_level: str,
    graceful_s: float = DEFAULT_GRACEFUL_SHUTDOWN_S,
    server_class: type[uvicorn.Server] = uvicorn.Server,
) -> uvicorn.Server:
    """On SIGTERM/SIGINT uvicorn stops accepting connections and gives the requests in flight
    ``graceful_s`` seconds before it cancels them."""
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(graceful_s)),
    )
    return server_class(config)


def serve_http(
    coordinator_address: str,
    tokenizer: Any | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    **options: Any,
) -> None:
    """Serve the OpenAI API on ``host:port`` until interrupted (blocks; Ctrl-C stops it).

    Raises ConfigurationError if the port cannot be bound, PeerLostError if the coordinator
    never acknowledged (the app's startup failed)."""
    app = create_app(coordinator_address, tokenizer, model_name, **options)
    sock = bind_socket(host, port)
    server = _uvicorn_server(app, log_level)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise PeerLostError(
            f"the HTTP server did not start: no answer from the coordinator at "
            f"{coordinator_address} (see the log)"
        )


class HTTPServerThread:
    """The HTTP server on a background thread of this process (its own event loop).

    For ``launch/serve.py`` (global rank 0 serves HTTP next to the coordinator) and for tests.
    ``start()`` returns once the server accepts connections, or raises if startup failed (for
    instance, the coordinator never answered).
    """

    def __init__(
        self,
        coordinator_address: str,
        tokenizer: Any | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        **options: Any,
    ) -> None:
        self.coordinator_address = coordinator_address
        self.app = create_app(coordinator_address, tokenizer, model_name, **options)
        self.socket = bind_socket(host, port)
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        self.server = _uvicorn_server(self.app, log_level)
        self.thread = threading.Thread(target=self._run, name="http-server", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:  # reported by start()
            self.error = exc
            log.error("the HTTP server stopped: %r", exc)

    def start(self, timeout_s: float = 60.0, wait: bool = True) -> HTTPServerThread:
        """Start serving; with ``wait`` (default) return once it accepts connections.

        ``wait=False`` suits a launch whose engines register only after this returns: the
        server connects to the coordinator in the background (``connect_timeout_s``).
        """
        self.thread.start()
        if not wait:
            return self
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                if self.thread.is_alive():
                    why = f"timeout after {timeout_s} s"
                elif self.error is None or isinstance(self.error, SystemExit):
                    # uvicorn exits with status 3 when the app's startup (CONNECT) failed.
                    why = (
                        f"startup failed (is the coordinator at {self.coordinator_address} up? "
                        "see the log)"
                    )
                else:
                    why = repr(self.error)
                raise RuntimeError(f"the HTTP server did not start: {why}")
            time.sleep(0.01)  # startup only: uvicorn exposes no event to wait on
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        self.socket.close()

    def __enter__(self) -> HTTPServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HTTPServerProcess:
    """The HTTP server in a spawned process of its own.

    For ``launch/serve.py``: global rank 0 also runs an engine loop, and an HTTP server on a
    thread there would take the GIL from it under load. In its own process it costs the engine
    nothing. The child binds first and reports its port (so ``port=0`` works), then connects to
    the coordinator in the background. It is SIGKILLed when its parent dies (Linux
    parent-death signal: ``megatron_coord.lifetime``), so start it from the main thread.
    ``tokenizer`` is a checkpoint directory or "gpt2" (the child loads it), or None.
    On SIGTERM it stops accepting connections and gives the HTTP requests in flight
    ``graceful_shutdown_s`` seconds (a launch: its coordinator's drain and STOP round).
    """

    def __init__(
        self,
        coordinator_address: str,
        tokenizer: str | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        graceful_shutdown_s: float = DEFAULT_GRACEFUL_SHUTDOWN_S,
        **options: Any,
    ) -> None:
        check_options(options)  # here, not only in the child: a typo fails the caller at once
        self.host = host
        self.port = port
        self.graceful_shutdown_s = graceful_shutdown_s
        self._args = (
            coordinator_address,
            tokenizer,
            model_name,
            host,
            port,
            log_level,
            graceful_shutdown_s,
            options,
        )
        self.process: multiprocessing.process.BaseProcess | None = None

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    def start(self, timeout_s: float = 120.0) -> HTTPServerProcess:
        """Spawn the server; return once it is bound and its tokenizer loaded (its port known),
        before it has connected to the coordinator."""
        warn_unless_main_thread("the HTTP server process")
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_server_process_main,
            args=(child_end, os.getpid(), *self._args),
            name="megatron-coord-http",
            daemon=True,
        )
        self.process.start()
        child_end.close()
        try:
            if not parent_end.poll(timeout_s):
                raise RuntimeError("the HTTP server process did not report its port in time")
            reply = parent_end.recv()
        except (EOFError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"the HTTP server process failed to start: {exc}") from None
        finally:
            parent_end.close()
        if isinstance(reply, ConfigurationError):
            self.stop()
            raise reply
        if isinstance(reply, str):
            self.stop()
            raise RuntimeError(f"the HTTP server process failed to start: {reply}")
        self.port = reply
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL after ``timeout_s`` (default:
        the graceful shutdown's time and 5 s more)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.is_alive():
            process.terminate()
            process.join(self.graceful_shutdown_s + 5.0 if timeout_s is None else timeout_s)
        if process.is_alive():
            process.kill()
        process.join()


def _server_process_main(
    conn: Any,
    parent_pid: int,
    coordinator_address: str,
    tokenizer: str | None,
    model_name: str,
    host: str,
    port: int,
    log_level: str,
    graceful_s: float,
    options: dict[str, Any],
) -> None:
    """Target of HTTPServerProcess: bind, load the tokenizer, report the port (or the error),
    serve."""
    die_with_parent(signal.SIGKILL, parent_pid)  # its parent gone, nothing is worth finishing
    logging.basicConfig(level=log_level.upper())
    try:
        sock = bind_socket(host, port)
        loaded, options = cli_app_inputs(tokenizer, options)
        app = create_app(coordinator_address, loaded, model_name, **options)
    except ConfigurationError as exc:  # reported to the parent, which raises it
        conn.send(exc)
        return
    except Exception as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    conn.send(sock.getsockname()[1])
    conn.close()
    with contextlib.suppress(KeyboardInterrupt):
        _uvicorn_server(app, log_level, graceful_s).run(sockets=[sock])


def load_cli_tokenizer(spec: str | None) -> Any | None:
    """The tokenizer named on the command line: None, 'gpt2', or a checkpoint directory."""
    if spec is None:
        return None
    from ..tokenizer import gpt2_tokenizer, load_tokenizer

    return gpt2_tokenizer() if spec == "gpt2" else load_tokenizer(spec)


# ServerOptions field -> the Hugging Face config.json key it defaults to.
_CHECKPOINT_LIMITS = {"max_model_len": "max_position_embeddings", "vocab_size": "vocab_size"}


def checkpoint_limits(spec: str | None) -> dict[str, int]:
    """The context and vocabulary of the checkpoint directory ``spec`` (its config.json), as
    ServerOptions fields; {} for no directory, 'gpt2', or a config without them."""
    if spec is None or spec == "gpt2":
        return {}
    try:
        with open(os.path.join(spec, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {
        option: config[key]
        for option, key in _CHECKPOINT_LIMITS.items()
        if type(config.get(key)) is int and config[key] > 0
    }


def cli_app_inputs(spec: str | None, options: dict[str, Any]) -> tuple[Any | None, dict[str, Any]]:
    """The tokenizer named by ``spec`` and ``options`` with the checkpoint's limits filled in
    where they are not given."""
    filled = dict(options)
    for option, value in checkpoint_limits(spec).items():
        if filled.get(option) is None:
            filled[option] = value
    return load_cli_tokenizer(spec), filled
