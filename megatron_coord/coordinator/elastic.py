"""Engines that join and leave, clients that vanish, deadlines, limits and graceful shutdown.

``ElasticMixin`` is part of ``DataParallelInferenceCoordinator`` (kept in its own module so the
coordinator's hot path stays readable). It owns everything time- and fault-related; the
coordinator calls into it at a few points: per wake-up (``_after_wakeup``), when a request is
admitted (``_admit``) or freed (``_release``), when an engine registers (``_join``) and when a
peer is found gone.

Guarantees (the contract tests check):

* An engine is dead when its connection closes (socket monitor, any protocol) or, once it has
  sent a HEARTBEAT, after ``engine_timeout`` seconds without a single message (engines of ours
  report every second; those that ask get each HEARTBEAT answered, so they notice a lost
  coordinator).
  A dead engine gets no new request; each request it held gets exactly one outcome: sent again,
  unchanged, to a live engine if nothing of it reached the client, else an ``engine_failed``
  ERROR that says how much the client already received. With no live engine left it fails
  with ``no_engine``. A late reply from an engine declared dead is dropped (the request is no
  longer its), and the engine is told to ABORT what it held.
* Engines may register at any time (``data_parallel_size=0``: any number, none at first). A
  request that arrives while no engine is registered is refused at once with ``no_engine``
  (queuing it would hide an outage behind client timeouts). A HEARTBEAT from an engine that was
  declared dead re-registers it.
* A client whose connection closes has its requests aborted on their engines and forgotten.
* ``request_timeout``: past it the client gets ``timeout`` and the engine ABORT.
* Past ``max_outstanding`` / ``max_outstanding_per_engine``: ``overloaded``.
* SIGTERM/SIGINT (``install_signal_handlers``; the standalone coordinator and the launch's
  coordinator process use it): new requests get ``shutting_down``; those in flight have
  ``shutdown_grace`` seconds to finish, then fail with ``shutting_down``; then ``start()``
  returns.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import time
from typing import Any

import msgspec
import zmq

from ..protocol import ErrorCode, Headers, ProtocolError
from .limits import DeadlineQueue, Limits
from .liveness import DEFAULT_ENGINE_TIMEOUT_S, PeerMonitor, SilenceClock

logger = logging.getLogger("megatron_coord.coordinator")

_encode = msgspec.msgpack.Encoder().encode
_HEARTBEAT_REPLY = _encode([int(Headers.HEARTBEAT), {}])
DEFAULT_SHUTDOWN_GRACE_S = 10.0
_MAX_DEAD_REMEMBERED = 4096


class ElasticMixin:
    """Fault handling of the coordinator (see the module docstring). Not usable on its own."""

    # ------------------------------------------------------------------ setup

    def _init_elastic(self, options: dict[str, Any]) -> None:
        """Pop this module's options from ``options`` and set up its state."""
        self.limits = Limits(
            max_outstanding=options.pop("max_outstanding", Limits.max_outstanding),
            max_outstanding_per_engine=options.pop(
                "max_outstanding_per_engine", Limits.max_outstanding_per_engine
            ),
            request_timeout=options.pop("request_timeout", None),
        )
        self.engine_timeout = options.pop("engine_timeout", DEFAULT_ENGINE_TIMEOUT_S)
        self.shutdown_grace = float(options.pop("shutdown_grace", DEFAULT_SHUTDOWN_GRACE_S))
        self._silence = SilenceClock(self.engine_timeout)
        self._deadlines = DeadlineQueue()
        self._last_seen: dict[bytes, float] = {}  # heartbeating engines -> last message time
        self._submitted: dict[int, bytes] = {}  # request id -> SUBMIT frame sent to its engine
        self._engine_requests: dict[bytes, int] = {}  # engine -> requests outstanding on it
        self._gone_clients: set[bytes] = set()
        self._now = time.monotonic()
        self._stranger_fd: int | None = None
        self._shutdown_requested = False
        self._shutdown_deadline: float | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.engines_lost = 0  # engines declared dead so far (STATS)
        # Identities of engines declared dead, newest last (bounded): only these may come back
        # with a bare HEARTBEAT; any other newcomer must REGISTER.
        self._dead_engines: dict[bytes, None] = {}
        self._paused = False  # the clients' last PAUSE/UNPAUSE and SUSPEND/RESUME
        self._suspended = False
        self.requests_resubmitted = 0

    def _start_monitor(self) -> None:
        """Watch the ROUTER's connections (after bind)."""
        self._monitor = PeerMonitor(self.router_socket, heartbeat_timeout_s=self.engine_timeout)

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful shutdown (main thread only); the poll wakes at once."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request_shutdown()

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown at the next wake-up (safe from a signal handler)."""
        self._shutdown_requested = True

    def _poll_items(self) -> list[tuple[Any, int]]:
        items: list[tuple[Any, int]] = [
            (self.router_socket, zmq.POLLIN),
            (self._monitor.socket, zmq.POLLIN),
        ]
        if self._wake_r is not None:
            items.append((self._wake_r.fileno(), zmq.POLLIN))
        return items

    def _drain_wakeups(self) -> None:
        if self._wake_r is None:
            return
        try:
            while self._wake_r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _close_elastic(self) -> None:
        if self._wake_w is not None:
            signal.set_wakeup_fd(-1)
            self._wake_w.close()
            self._wake_r.close()
            self._wake_w = self._wake_r = None
        self._monitor.close()

    # ------------------------------------------------------------------ timers

    def _poll_timeout_ms(self) -> int:
        """Milliseconds until the next deadline (-1: none, block until a message)."""
        deadlines = [
            self._deadlines.next_deadline(),
            self._silence.next_deadline(self._last_seen.values()),
            self._shutdown_deadline,
        ]
        upcoming = [d for d in deadlines if d is not None]
        if not upcoming:
            return -1
        return max(0, int((min(upcoming) - time.monotonic()) * 1000) + 1)

    def _after_wakeup(self, monitor_ready: bool) -> None:
        """Everything not driven by a message: closed connections, silence, deadlines."""
        now = self._now
        if monitor_ready or self._monitor.pending:
            for identity in self._monitor.disconnected():
                self._peer_closed(identity)
        if self._last_seen:
            for identity in self._silence.silent(self._last_seen, now):
                self._engine_gone(
                    identity, f"no message from the engine for {self.engine_timeout:g} s"
                )
        if self.limits.request_timeout is not None:
            for request_id in self._deadlines.expired(now, self._request_engine):
                self._abort(
                    request_id,
                    ErrorCode.TIMEOUT,
                    f"no result within the request timeout ({self.limits.request_timeout:g} s); "
                    "aborted",
                )
            self._deadlines.compact(self._request_engine)
        if self._gone_clients:
            gone, self._gone_clients = self._gone_clients, set()
            for identity in gone:
                self._client_gone(identity)
        if self._shutdown_requested and self._shutdown_deadline is None:
            self._begin_shutdown()
        if self._shutdown_deadline is not None:
            self._continue_shutdown(now)

    # ------------------------------------------------------------------ admission

    def _admit(self) -> bytes:
        """The engine for a new request, or ProtocolError (no engine, overloaded, shutting down)."""
        if self._shutdown_deadline is not None or self._shutdown_requested:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
        if not self.identities_of_data_parallel_ranks:
            raise ProtocolError(ErrorCode.NO_ENGINE, "no engine is registered; retry later")
        if len(self._request_engine) >= self.limits.max_outstanding:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"{self.limits.max_outstanding} requests are in flight (the coordinator's "
                "limit); retry later",
            )
        engine = self.routing_policy.choose()
        cap = self.limits.max_outstanding_per_engine
        if self._engine_requests.get(engine, 0) >= cap:
            counts = self._engine_requests
            engine = min(self.identities_of_data_parallel_ranks, key=lambda e: counts.get(e, 0))
            if counts.get(engine, 0) >= cap:
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"every engine holds {cap} requests (the per-engine limit); retry later",
                )
        return engine

    def _admitted(self, engine: bytes, request_id: int) -> None:
        """Bookkeeping once ``request_id`` is routed to ``engine``."""
        self._engine_requests[engine] = self._engine_requests.get(engine, 0) + 1
        if self.limits.request_timeout is not None:
            self._deadlines.add(self._now + self.limits.request_timeout, request_id)

    def _release(self, engine: bytes, request_id: int) -> None:
        """Bookkeeping once ``request_id`` left ``engine`` (any outcome)."""
        self._submitted.pop(request_id, None)
        self._count_down(engine)

    def _count_down(self, engine: bytes) -> None:
        """One request fewer outstanding on ``engine`` (the entry goes at zero)."""
        count = self._engine_requests.get(engine)
        if count is not None:
            if count > 1:
                self._engine_requests[engine] = count - 1
            else:
                del self._engine_requests[engine]

    # ------------------------------------------------------------------ engines

    def _note_control(self, header: Headers) -> None:
        if header in (Headers.PAUSE, Headers.UNPAUSE):
            self._paused = header == Headers.PAUSE
        elif header in (Headers.SUSPEND, Headers.RESUME):
            self._suspended = header == Headers.SUSPEND

    def _join(self, identity: bytes) -> None:
        """An engine registered while serving: route to it from now on, in the state the
        clients put the others in (paused, suspended, stopping)."""
        self.identities_of_data_parallel_ranks.append(identity)
        self.routing_policy.add_engine(identity)
        if self._stopping:
            catch_up = [Headers.STOP]
        else:
            catch_up = [Headers.PAUSE] * self._paused + [Headers.SUSPEND] * self._suspended
        for header in catch_up:
            self._send(identity, _encode([int(header)]))
        logger.info(
            "engine %r joined; %d engine(s) now",
            identity,
            len(self.identities_of_data_parallel_ranks),
        )

    def _engine_unreachable(self, engine: bytes, request_id: int) -> None:
        """A send to ``engine`` failed: its connection is gone."""
        if engine in self.engines:
            self._engine_gone(engine, "the engine is unreachable")
        elif self._request_engine.get(request_id) == engine:
            self._fail_over(request_id, engine, "the engine is unreachable")

    def _heard_from(self, engine: Any) -> None:
        """Any message from an engine of ours proves it alive."""
        if engine.identity in self._last_seen:
            self._last_seen[engine.identity] = self._now

    def _was_declared_dead(self, identity: bytes) -> bool:
        """Whether ``identity`` is an engine this coordinator declared dead (it may return)."""
        return self._dead_engines.pop(identity, 0) is None

    def _on_heartbeat(self, engine: Any) -> None:
        """An engine that heartbeats is watched for silence from now on; engines that asked
        (``"heartbeat_reply": true`` in REGISTER or HEARTBEAT) get an answer, so they notice
        a lost coordinator."""
        self._last_seen[engine.identity] = self._now
        info = engine.info
        if (info is not None and info.get("heartbeat_reply") is True) or (
            engine.load.get("heartbeat_reply") is True
        ):
            self._send(engine.identity, _HEARTBEAT_REPLY)

    def _peer_closed(self, identity: bytes) -> None:
        if identity in self.engines:
            self._engine_gone(identity, "the engine's connection closed")
        elif identity in self.clients:
            self._client_gone(identity)

    def _engine_gone(self, identity: bytes, reason: str) -> None:
        """Declare an engine dead: no more routing; one outcome for each request it held."""
        engine = self.engines.pop(identity, None)
        if engine is None:
            return
        self.engines_lost += 1
        self._dead_engines[identity] = None
        if len(self._dead_engines) > _MAX_DEAD_REMEMBERED:
            del self._dead_engines[next(iter(self._dead_engines))]
        self._last_seen.pop(identity, None)
        self._monitor.forget(identity)
        if identity in self.identities_of_data_parallel_ranks:
            self.identities_of_data_parallel_ranks.remove(identity)
        if identity in self.routing_policy.engines:
            self.routing_policy.remove_engine(identity)
        held = [rid for rid, e in self._request_engine.items() if e == identity]
        logger.error(
            "engine %r (dp rank %s) is dead: %s; %d request(s) in flight on it; %d engine(s) left",
            identity,
            engine.data_parallel_rank,
            reason,
            len(held),
            len(self.identities_of_data_parallel_ranks),
        )
        abort = int(Headers.ABORT)
        for request_id in held:
            self._send_quietly(identity, _encode([abort, request_id]))  # if it still lives
            self._fail_over(request_id, identity, reason)
        self._engine_requests.pop(identity, None)
        self._pause_acks.discard(identity)
        self._stop_acks.discard(identity)
        self._check_acks_complete()

    def _fail_over(self, request_id: int, dead: bytes, reason: str) -> None:
        """Send a dead engine's request to a live one, or fail it (exactly one outcome)."""
        stream = self._streams.get(request_id)
        if stream is not None and stream.tokens:
            self._fail(
                request_id,
                ErrorCode.ENGINE_FAILED,
                f"the engine serving this request died ({reason}) after {len(stream.tokens)} "
                "token(s) were streamed to you; a partial generation cannot be resumed",
            )
            return
        payload = self._submitted.get(request_id)
        if self._shutdown_deadline is not None or payload is None:
            self._fail(request_id, ErrorCode.SHUTTING_DOWN, f"the engine stopped ({reason})")
            return
        if not self.identities_of_data_parallel_ranks:
            self._fail(
                request_id,
                ErrorCode.NO_ENGINE,
                f"the engine serving this request died ({reason}) and no other engine is "
                "registered",
            )
            return
        engine = self.routing_policy.choose()
        self._request_engine[request_id] = engine
        self._count_down(dead)
        self._engine_requests[engine] = self._engine_requests.get(engine, 0) + 1
        if self._tracks_load:
            self.routing_policy.on_resubmit(dead, engine, request_id)
        self.requests_resubmitted += 1
        if not self._send(engine, payload):
            self._fail(request_id, ErrorCode.ENGINE_FAILED, "no engine could take the request")

    def _check_acks_complete(self) -> None:
        """After an engine left, a PAUSE or STOP may now be acknowledged by every live engine."""
        live = set(self.identities_of_data_parallel_ranks)
        for acks, header in (
            (self._pause_acks, Headers.PAUSE_ACK),
            (self._stop_acks, Headers.STOP_ACK),
        ):
            if acks and header not in self._acks_done and live <= acks:
                self._all_acked(header)

    # ------------------------------------------------------------------ clients

    def _client_gone(self, identity: bytes) -> None:
        """A client's connection closed: abort its requests on their engines, forget them."""
        self.clients.pop(identity, None)
        self._monitor.forget(identity)
        mine = [rid for (client, _), rid in self._inflight.items() if client == identity]
        for request_id in mine:
            self._abort(request_id)
        if mine:
            logger.info("client %r is gone: %d request(s) aborted", identity, len(mine))

    def _abort(self, request_id: int, code: ErrorCode | None = None, text: str = "") -> None:
        """ABORT a request on its engine and end it: with an ERROR ``code`` to its client, or
        (None: the client is gone) silently."""
        engine = self._request_engine.get(request_id)
        if engine is not None:
            self._send_quietly(engine, _encode([int(Headers.ABORT), request_id]))
        if code is None:
            self._free(request_id)
        else:
            self._fail(request_id, code, text)

    def _send_quietly(self, identity: bytes, payload: bytes) -> None:
        """Send if the peer is still connected; never mistake an engine for a gone client."""
        with contextlib.suppress(zmq.ZMQError):
            self.router_socket.send_multipart([identity, payload], zmq.NOBLOCK)

    # ------------------------------------------------------------------ shutdown

    def _begin_shutdown(self) -> None:
        self._shutdown_deadline = time.monotonic() + self.shutdown_grace
        logger.warning(
            "shutting down: %d request(s) in flight get %g s to finish",
            len(self._request_engine),
            self.shutdown_grace,
        )

    def _continue_shutdown(self, now: float) -> None:
        if self._request_engine and now < self._shutdown_deadline:
            return
        for request_id in list(self._request_engine):
            self._abort(request_id, ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
        self._running = False

    # ------------------------------------------------------------------ debug view

    def _map_sizes(self) -> dict[str, int]:
        """Sizes of every per-request and per-peer map (all 0 / engines-only when idle)."""
        sizes = {
            "request_id_to_client_id": len(self.request_id_to_client_id),
            "request_id_to_client_request_id": len(self.request_id_to_client_request_id),
            "request_engine": len(self._request_engine),
            "inflight": len(self._inflight),
            "prompt_text": len(self._prompt_text),
            "streams": len(self._streams),
            "submitted": len(self._submitted),
            "engine_requests": len(self._engine_requests),
            "deadlines": len(self._deadlines),
            "pending": len(self._pending),
        }
        sizes.update(self._monitor.sizes)
        return sizes
