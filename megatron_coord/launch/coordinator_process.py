"""The coordinator process of a launch: global rank 0 spawns it, and ends it last.

``spawn_coordinator`` starts ``DataParallelInferenceCoordinator.entrypoint`` in a
``multiprocessing`` 'spawn' process, with a Pipe for its bound address (or the configuration
error that kept it from binding) and an Event for readiness (every replica registered). The
child dies with its parent (SIGHUP, ``megatron_coord.lifetime``), which it takes as "fail what
is in flight and exit now".
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from typing import Any

from ..exit_codes import CONFIG_ERROR, ConfigurationError
from ..lifetime import die_with_parent, warn_unless_main_thread

COORDINATOR_START_TIMEOUT_S = 120.0


def _coordinator_main(
    pipe_connection: Any,
    ready_event: Any,
    parent_pid: int,
    data_parallel_size: int,
    tokenizer_path: Any,
    port: int | None,
    deterministic_mode: bool,
    options: dict[str, Any],
) -> None:
    """Target of the spawned coordinator process: load the tokenizer and serve.

    ``tokenizer_path`` is a checkpoint directory, or a (picklable) tokenizer object itself:
    a training script's own (megatron_coord.training_inference).

    Rank 0's death sends it SIGHUP, which ``GracefulShutdown`` takes as "fail what is in
    flight and exit now" (until its handlers are installed: the default action, death)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # not ignored, even under nohup
    die_with_parent(signal.SIGHUP, parent_pid)
    # SIGTERM before the coordinator is up ends the process like Ctrl-C would; once it
    # serves, SIGTERM/SIGINT drain (GracefulShutdown).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from ..coordinator.coordinator import DataParallelInferenceCoordinator
    from ..tokenizer import as_megatron_tokenizer, load_tokenizer

    if isinstance(tokenizer_path, str):
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = as_megatron_tokenizer(tokenizer_path)
    try:
        DataParallelInferenceCoordinator.entrypoint(
            pipe_connection,
            ready_event,
            data_parallel_size,
            tokenizer,
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
    tokenizer_path: Any,
    port: int | None = None,
    deterministic_mode: bool = False,
    options: dict[str, Any] | None = None,
    import_main: bool = True,
) -> tuple[multiprocessing.process.BaseProcess, str, Any]:
    """Start the coordinator process; return (process, address, ready_event).
    ``tokenizer_path``: a checkpoint directory or a picklable tokenizer object.
    ``import_main=False``: the child does not import the parent's ``__main__`` (see
    ``_main_hidden``).

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
    with contextlib.nullcontext() if import_main else _main_hidden():
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


@contextlib.contextmanager
def _main_hidden() -> Any:
    """While a 'spawn' child starts, its parent's ``__main__`` has no file and no spec, so the
    child does not import it. A 'spawn' child imports its parent's main script (to find what
    the target names there); a training script written without an ``if __name__ ==
    "__main__"`` guard, as torchrun scripts often are, would then run again in the
    coordinator process, initialize torch.distributed and hang the start. The coordinator's
    target lives in this package, so it needs nothing from ``__main__``."""
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        for name in saved:
            setattr(main, name, None) if name == "__spec__" else delattr(main, name)
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


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
