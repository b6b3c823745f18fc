"""Several HTTP worker processes behind one port: ``--http-workers N``.

One uvicorn process is the bottleneck at high concurrency (its event loop serialises every
request's JSON, SSE framing and client bookkeeping on one core). ``HTTPWorkerPool`` runs N of
them: each worker binds the same port with SO_REUSEPORT (the kernel spreads new connections
over the listening workers), loads the tokenizer, builds the same app (so /health and the API
key check behave the same in each) and holds its own ``InferenceClient`` connection to the
coordinator. The supervisor (the pool object, in the caller's process) holds the port bound
but not listening, so a port-0 choice stays the workers', and watches them from a thread:

* a worker that dies (anything but a requested stop: SIGTERM/SIGINT, which reach the workers
  themselves from a terminal or torchrun, and which they drain on) is started again at once, serving without
  waiting for the coordinator (``/health/ready`` tells when it is connected). Its in-flight
  HTTP requests end with their connection: the kernel closes a dead process's sockets, so the
  HTTP clients see the connection closed before a complete response (never a hang), and the
  coordinator, seeing the worker's DEALER close, aborts its requests on the engines.
* /metrics: every worker writes its request metrics into one directory (prometheus_client
  multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` set for the workers only); whichever worker
  answers a scrape reports the sum over all of them (see metrics.py).

Workers die with their supervisor (PR_SET_PDEATHSIG, SIGKILL).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import uvicorn

from ..exit_codes import ConfigurationError, PeerLostError
from ..lifetime import die_with_parent
from .runner import DEFAULT_GRACEFUL_SHUTDOWN_S, _url, _uvicorn_server, bind_socket
from .state import DEFAULT_MODEL_NAME, check_options

log = logging.getLogger(__name__)

_RESTART_BACKOFF_S = 1.0  # a worker that dies within this of its start waits this long
# Exit codes of a worker that was asked to stop: uvicorn drains on SIGTERM/SIGINT, then raises
# the signal again (so the process ends "killed by" it).
_STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)


def worker_count(spec: str | int) -> int:
    """``--http-workers``: a positive integer, or ``auto`` (the cores this process may use)."""
    if spec == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        count = int(spec)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigurationError(
            f"--http-workers must be a positive integer or 'auto', not {spec!r}"
        )
    return count


class _Worker:
    """One worker slot: its process and when it started."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.started_at = 0.0


class HTTPWorkerPool:
    """N HTTP worker processes serving one port, restarted when they die (see module doc).

    Same shape as ``HTTPServerProcess``: ``start()`` returns once every worker is bound (and,
    with ``wait_for_coordinator``, connected to the coordinator: a coordinator that never
    answers raises PeerLostError), ``port`` and ``url`` then say where; ``stop()`` ends them.
    ``tokenizer``: a checkpoint directory or "gpt2" (each worker loads it), or None.
    """

    def __init__(
        self,
        coordinator_address: str,
        workers: int,
        tokenizer: str | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        graceful_shutdown_s: float = DEFAULT_GRACEFUL_SHUTDOWN_S,
        **options: Any,
    ) -> None:
        check_options(options)
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.coordinator_address = coordinator_address
        self.host = host
        self.port = port
        self.graceful_shutdown_s = graceful_shutdown_s
        self._config = (
            coordinator_address,
            tokenizer,
            model_name,
            host,
            log_level,
            graceful_shutdown_s,
        )
        self._options = options
        self._workers = [_Worker(i) for i in range(workers)]
        self._ctx = multiprocessing.get_context("spawn")
        self._reservation = None
        self.metrics_dir: str | None = None
        self.restarts = 0  # dead workers replaced by one that serves
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    @property
    def pids(self) -> list[int | None]:
        """Each slot's worker process id (None while it is being replaced)."""
        with self._lock:
            return [w.process.pid if w.process is not None else None for w in self._workers]

    def start(self, timeout_s: float = 120.0) -> HTTPWorkerPool:
        """Hold the port, start every worker, return once all serve; then supervise."""
        self._reservation = bind_socket(self.host, self.port, reuse_port=True, listen=False)
        self.port = self._reservation.getsockname()[1]
        self.metrics_dir = tempfile.mkdtemp(prefix="megatron-coord-http-metrics-")
        try:
            pending = [(w, self._spawn(w, self._options)) for w in self._workers]
            for worker, conn in pending:
                self._await_worker(worker, conn, timeout_s)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._supervise, name="http-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM every worker (uvicorn drains gracefully), SIGKILL after ``timeout_s``
        (default: the graceful shutdown's time and 5 s more); free the port and the files."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            processes = [w.process for w in self._workers if w.process is not None]
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + (
            self.graceful_shutdown_s + 5.0 if timeout_s is None else timeout_s
        )
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None

    def wait(self) -> None:
        """Block until ``stop()`` (from a signal handler or another thread)."""
        self._stopping.wait()

    def __enter__(self) -> HTTPWorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ workers

    def _spawn(self, worker: _Worker, options: dict[str, Any]) -> Any:
        """Start the process of ``worker``'s slot; returns the pipe it reports on."""
        parent_end, child_end = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_end, os.getpid(), worker.index, self.port, self.metrics_dir, *self._config),
            kwargs={"options": options},
            name=f"megatron-coord-http-{worker.index}",
            daemon=True,
        )
        # The workers' prometheus_client must see the directory when it is first imported (it
        # picks its value class then); only their environment gets it.
        with _environment(PROMETHEUS_MULTIPROC_DIR=self.metrics_dir):
            process.start()
        child_end.close()
        with self._lock:
            worker.process = process
            worker.started_at = time.monotonic()
        return parent_end

    def _await_worker(self, worker: _Worker, conn: Any, timeout_s: float) -> None:
        """Wait for a worker to say it serves; raise what it failed with."""
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not conn.poll(left):
                    raise RuntimeError(f"HTTP worker {worker.index} did not start in {timeout_s} s")
                kind, value = conn.recv()
                if kind == "serving":
                    return
                if kind == "error":
                    raise value if isinstance(value, ConfigurationError) else RuntimeError(value)
        except EOFError:
            raise PeerLostError(
                f"HTTP worker {worker.index} did not start: no answer from the coordinator at "
                f"{self.coordinator_address}? (see the log)"
            ) from None
        finally:
            conn.close()

    def _supervise(self) -> None:
        """Replace every worker that dies (not by a requested stop) until the pool stops."""
        from prometheus_client import multiprocess

        while not self._stopping.is_set():
            with self._lock:
                sentinels = {w.process.sentinel: w for w in self._workers if w.process is not None}
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            for sentinel in ready:
                worker = sentinels[sentinel]
                process = worker.process
                process.join()
                multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # live gauges
                if self._stopping.is_set():
                    return
                if process.exitcode in _STOPPED:  # asked to stop (a signal to its process group)
                    log.info("HTTP worker %d (pid %d) stopped", worker.index, process.pid)
                    with self._lock:
                        worker.process = None
                    continue
                self._replace(worker, process)

    def _replace(self, worker: _Worker, dead: Any) -> None:
        log.error(
            "HTTP worker %d (pid %d) died (exit code %s); starting a new one; its open "
            "connections were closed",
            worker.index,
            dead.pid,
            dead.exitcode,
        )
        if time.monotonic() - worker.started_at < _RESTART_BACKOFF_S:
            self._stopping.wait(_RESTART_BACKOFF_S)  # a crash loop must not spin
            if self._stopping.is_set():
                return
        # A new worker serves at once and connects in the background: /health/ready says when.
        conn = self._spawn(worker, {**self._options, "wait_for_coordinator": False})
        try:
            self._await_worker(worker, conn, 120.0)
            self.restarts += 1  # counted once it serves
        except Exception as exc:  # it died too: the next round of the loop replaces it again
            log.error("the new HTTP worker %d failed to start: %s", worker.index, exc)


@contextlib.contextmanager
def _environment(**values: str | None) -> Any:
    """Set environment variables for the duration (for a child about to be spawned)."""
    old = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _ReportingServer(uvicorn.Server):
    """uvicorn's server, telling the supervisor once it accepts connections."""

    on_started: Any = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def _worker_main(
    conn: Any,
    supervisor_pid: int,
    index: int,
    port: int,
    metrics_dir: str,
    coordinator_address: str,
    tokenizer: str | None,
    model_name: str,
    host: str,
    log_level: str,
    graceful_s: float,
    options: dict[str, Any],
) -> None:
    """One worker: bind the shared port, build the app, serve; report to the supervisor."""
    die_with_parent(signal.SIGKILL, supervisor_pid)
    logging.basicConfig(level=log_level.upper())
    from .app import create_app
    from .metrics import ServingMetrics
    from .runner import cli_app_inputs

    try:
        sock = bind_socket(host, port, reuse_port=True)
        metrics = ServingMetrics(multiprocess_dir=metrics_dir)
        loaded, options = cli_app_inputs(tokenizer, options)
        app = create_app(coordinator_address, loaded, model_name, metrics=metrics, **options)
    except ConfigurationError as exc:
        conn.send(("error", exc))
        return
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    server = _uvicorn_server(app, log_level, graceful_s, server_class=_ReportingServer)
    server.on_started = lambda: (conn.send(("serving", os.getpid())), conn.close())
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(3)  # the coordinator never answered (exit_codes: a lost peer)
