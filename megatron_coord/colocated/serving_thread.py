"""A rank's serving loop in a background thread, and parking it while the script trains.

The thread runs ``EngineServer.run_once`` over and over (its collectives on the serving groups,
layout.py). After each iteration it checks one thing: the engine is suspended (a SUSPEND from
the coordinator reached every rank of the replica in the same step's broadcast) and the owner
asked to park (``request_park``). Then it **parks**: it waits on a local ``threading.Event``
with no collective pending, so the script's training collectives, and the weight update's
agreement collectives run by the script's thread (``while_parked``), never meet a serving one.
``unpark`` lets it go on; the engine stays suspended until RESUME arrives by the socket.

A parked TP-coordinator must not look dead to the coordinator: the step-heartbeat thread
(engine/step_heartbeat.py) keeps beating, as during a long step; the parked thread restarts
its clock now and then so that a long training phase never reaches ``max_step_s``. Whoever
uses the replica's socket meanwhile (an update's records) holds ``socket_lock``, the hand-over
ZMQ asks for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..engine.server import EngineServer

log = logging.getLogger(__name__)


class ServingThread:
    """``server``'s loop on a daemon thread; its collectives on ``tp_group`` (model side)."""

    def __init__(self, server: EngineServer, model_tp: Any, serving_tp_group: Any) -> None:
        self.server = server
        self._model_tp = model_tp
        self._serving_tp_group = serving_tp_group
        self._run = threading.Event()  # clear: park once suspended
        self._run.set()
        self._parked = False
        self._closing = False
        self.error: BaseException | None = None
        self.finished = False
        self.socket_lock = threading.Lock()
        self._changed = threading.Condition()
        self._refresh_s = (
            min(10.0, server.heartbeats.during_steps.max_step_s / 4)
            if (server.heartbeats.during_steps is not None)
            else 10.0
        )
        self.thread = threading.Thread(
            target=self._main, name="megatron-coord-serving", daemon=True
        )

    # ----------------------------------------------------------------- the thread
    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        self._model_tp.use_group_in_this_thread(self._serving_tp_group)
        server = self.server
        if server.engine.device.type == "cuda":
            torch.cuda.set_device(server.engine.device)  # the current device is per thread
        try:
            while not server.done:
                server.run_once()
                self._notify()
                if server.engine.suspended and not self._run.is_set() and not self._closing:
                    self._park()
        except BaseException as exc:  # noqa: BLE001 - reported to the script's thread
            log.exception("rank %d: the serving loop failed", server.state.rank)
            self.error = exc
        finally:
            self.finished = True
            self._notify()

    def _park(self) -> None:
        beat = self.server.heartbeats.during_steps
        with self.socket_lock:
            if beat is not None:
                beat.begin()  # heartbeats go on, as during a long step
            self._parked = True
        self._notify()
        while not self._run.wait(self._refresh_s):
            with self.socket_lock:
                if beat is not None:
                    beat.begin()  # a fresh clock: a long training phase is no hung step
        with self.socket_lock:
            if beat is not None:
                beat.end()
            self._parked = False
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # ----------------------------------------------------------------- the script's side
    @property
    def parked(self) -> bool:
        return self._parked

    @property
    def alive(self) -> bool:
        return not self.finished

    def request_park(self) -> None:
        """Park at the first step boundary where the engine is suspended."""
        self._run.clear()

    def unpark(self, closing: bool = False) -> None:
        """Go on serving (``closing``: and never park again)."""
        self._closing = self._closing or closing
        self._run.set()

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Block until ``predicate()`` holds (checked after every loop iteration). Raises
        RuntimeError if the loop ended first, TimeoutError after ``timeout_s``."""
        with self._changed:
            ok = self._changed.wait_for(lambda: predicate() or self.finished, timeout_s)
        if predicate():
            return
        self.check()
        if self.finished:
            raise RuntimeError(f"the serving loop ended before {what}")
        if not ok:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")

    def check(self) -> None:
        """Raise RuntimeError if the serving loop failed."""
        if self.error is not None:
            raise RuntimeError(f"the serving loop failed: {self.error!r}") from self.error

    def while_parked(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the caller's thread while parked (it may run the replica's
        collectives and use its socket); heartbeats go on around it."""
        if not self._parked:
            raise RuntimeError("the serving loop is not parked")
        beat = self.server.heartbeats.during_steps
        with self.socket_lock:
            try:
                return fn()
            finally:
                if beat is not None:
                    beat.begin()  # the update ended the heartbeats' step: still parked

    def join(self, timeout_s: float) -> bool:
        """Wait for the loop to end; True if it did."""
        self.thread.join(timeout_s)
        return not self.thread.is_alive()
