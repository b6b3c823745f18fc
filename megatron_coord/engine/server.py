"""The per-replica serving loop: coordinator socket -> TP broadcast -> engine step -> replies.

Every rank of a replica runs ``EngineServer.run``. Each iteration:

1. The TP-coordinator (TP rank 0) drains its DEALER without blocking while the engine has work.
   When the replica is idle (nothing to run, or paused/suspended/stopping) it instead blocks on
   the socket with a timeout (zmq poll; a signal wakes it at once), so it neither spins nor
   sleeps a fixed time, and it still broadcasts after the timeout, so followers waiting in the
   collective never reach the collective timeout.
2. It validates what it drained (bad requests get an ERROR reply and never reach the group) and
   broadcasts the step's requests and signals to its TP group (tp_broadcast).
3. Every rank applies the same inputs, steps the same engine, and the TP-coordinator sends the
   finished records and streaming chunks back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..parallel_state import ParallelState
from ..protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    Headers,
    ProtocolError,
    decode,
    encode,
)
from ..sampling_params import SamplingParams
from .engine import InferenceEngine, StepResult
from .sampling import choose_seed
from .step_guard import DEFAULT_MAX_STEP_FAILURES, DEFAULT_PROBE_INTERVAL_S, StepGuard
from .step_heartbeat import DEFAULT_MAX_STEP_S, StepHeartbeat
from .tp_broadcast import ABORT_SIGNAL, SHUTDOWN_SIGNAL, NewRequest, StepInputs, TPBroadcaster

log = logging.getLogger(__name__)

_FORWARDED_SIGNALS = {
    Headers.PAUSE,
    Headers.UNPAUSE,
    Headers.SUSPEND,
    Headers.RESUME,
    Headers.STOP,
    Headers.PAUSE_ACK,
    Headers.STOP_ACK,
}


DEFAULT_JOIN_TIMEOUT_S = 60.0
DRAIN_SILENCE_S = 3.0  # a draining replica whose coordinator is silent this long leaves

# The request id of a replica's self-probes (coordinator request ids are never negative).
PROBE_REQUEST_ID = -2


def engine_identity(data_parallel_rank: int) -> bytes:
    """The DEALER identity of a replica's TP-coordinator."""
    return b"mp-coord-%d" % data_parallel_rank


def joined_identity(data_parallel_rank: int) -> bytes:
    """A fresh identity for each registration of a joined replica: a restarted replica, another
    job, or this replica registering again never reuses one (a ROUTER ignores a connection
    whose identity a closing one still holds)."""
    return engine_identity(data_parallel_rank) + b"-" + os.urandom(4).hex().encode()


class EngineServer:
    """Runs one replica's engine against the coordinator until STOP or a shutdown signal."""

    def __init__(
        self,
        engine: InferenceEngine,
        state: ParallelState,
        coordinator_address: str | None,
        deterministic_mode: bool = False,
        idle_timeout_s: float = 1.0,
        coordinator_alive: Callable[[], bool] | None = None,
        heartbeat_interval_s: float | None = None,
        identity: bytes | None = None,
        coordinator_timeout_s: float | None = None,
        auth_keys: str | None = None,
        reconnect: bool = False,
        join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
        on_joined: Callable[[], None] | None = None,
        max_step_s: float = DEFAULT_MAX_STEP_S,
        max_step_failures: int = DEFAULT_MAX_STEP_FAILURES,
        probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
        drain_s: float | None = None,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.state = state
        self.deterministic_mode = deterministic_mode
        self.idle_timeout_ms = max(1, int(idle_timeout_s * 1000))
        self.broadcaster = TPBroadcaster(state)
        # Failed steps fail their requests, on every rank alike (step_guard.py). Unhealthy and
        # idle, the TP-coordinator sends a one-token probe through the group now and then.
        self.guard = StepGuard(engine, state, max_step_failures)
        self.probe_interval_s = probe_interval_s
        self._next_probe = 0.0
        # Replica state, identical on every rank of the group (changed only by broadcast inputs).
        self.paused = False
        self.stop_received = False
        self.done = False
        self.steps = 0
        self.generated_tokens = 0
        self.processed_tokens = 0  # prompt tokens prefilled + tokens generated (load reports)
        # TP-coordinator only: shutdown requests (signals, another thread) and the socket.
        self.shutdown_requested = False
        self.socket: zmq.Socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # Rank 0 owns the coordinator process: if it dies before STOP, the replica must not
        # wait forever on a socket nobody will ever write to.
        self.coordinator_alive = coordinator_alive
        self.coordinator_lost = False
        self.lost_reason: str | None = None  # why, when coordinator_lost
        # HEARTBEAT load reports (the coordinator shows them in STATS); None: never sent. They
        # start once the coordinator has spoken: before every engine registered it would only
        # queue (or drop) them.
        self.heartbeat_interval_s = heartbeat_interval_s
        self._next_heartbeat = 0.0
        self._heard_from_coordinator = False
        # A replica that joined an outside coordinator (launch --coordinator-address): it
        # heartbeats from the start, asks for answers, and gives up after this much silence.
        self.identity = identity or engine_identity(state.dp_rank)
        self.coordinator_timeout_s = coordinator_timeout_s
        self.auth_keys = auth_keys
        self.coordinator_address = coordinator_address
        self._last_heard = time.monotonic()
        # Joined, with reconnect: a lost coordinator is waited for (re-register every
        # coordinator_timeout_s) instead of ending the replica.
        self.reconnect = reconnect
        self._reconnect_pending = False
        # Requests whose outcome is never sent: our own probes, and those of a coordinator we
        # registered away from.
        self._silenced: set[int] = {PROBE_REQUEST_ID}
        # Joined: a REGISTER is not acknowledged, so the replica has joined once the coordinator
        # answers (its first HEARTBEAT, usually); until then it waits join_timeout_s at most,
        # after every (re-)registration. on_joined (TP-coordinator) is told each time.
        self.joined = False
        self._answered = False
        self.join_timeout_s = join_timeout_s
        self.on_joined = on_joined
        self._join_deadline = 0.0
        # Heartbeats during steps longer than the interval (step_heartbeat.py).
        self._step_heartbeat: StepHeartbeat | None = None
        # A launch's own coordinator drains on SIGTERM and then STOPs every engine: with
        # drain_s, a first SIGTERM/SIGINT keeps this replica serving (on_drain, rank 0: pass it
        # on to the coordinator) until that STOP, or drain_s at most; a second ends it at once.
        self.drain_s = drain_s
        self.on_drain = on_drain
        self.drain_deadline: float | None = None
        self._drain_started = 0.0
        # Block events go out in heartbeats, so only the TP-coordinator keeps them.
        engine.blocks.record_events = state.is_tp_coordinator
        if state.is_tp_coordinator:
            if coordinator_address is None:
                raise ValueError("the TP-coordinator needs the coordinator's address")
            self._connect(coordinator_address)
            if heartbeat_interval_s is not None:
                self._step_heartbeat = StepHeartbeat(
                    self._beat_during_step, heartbeat_interval_s, max_step_s
                )

    # ----------------------------------------------------------------- sockets
    def _connect(self, address: str) -> None:
        self.context = zmq.Context()
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 2000)
        if self.coordinator_timeout_s is not None:
            # Joined: a send that cannot leave (no connection, e.g. refused by CURVE) must not
            # block the replica forever.
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.coordinator_timeout_s * 1000)))
        if self.auth_keys is not None:
            from ..auth import apply_client

            apply_client(sock, self.auth_keys)
        sock.connect(address)
        self.socket = sock
        self._registered_at = time.monotonic()
        self._join_deadline = self._registered_at + self.join_timeout_s
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        # Answers to our heartbeats tell a lost coordinator from a quiet one (joined replicas;
        # a launch's replicas while they drain).
        info: dict[str, Any] = {
            "data_parallel_rank": self.state.dp_rank,
            "protocol": PROTOCOL_VERSION,
            "heartbeat_reply": True,
            # How to name this replica's KV blocks (prefix_hash.block_hashes), and whether it
            # caches them at all.
            "kv_block_size": self.engine.blocks.block_size,
            "prefix_caching": self.engine.blocks.caching,
        }
        # A (new) coordinator knows nothing of our cache: the next report lists all of it.
        self.engine.blocks.request_snapshot()
        if self.coordinator_timeout_s is not None:  # joined: say who we are
            info.update(pid=os.getpid(), host=socket.gethostname())
        self._send([Headers.REGISTER, info])

    def _send(self, message: list[Any]) -> None:
        assert self.socket is not None
        try:
            self.socket.send(encode(message))
        except zmq.Again:  # only with SNDTIMEO (joined replicas)
            self._lose_coordinator(
                f"a message could not be sent for {self.coordinator_timeout_s:g} s (not "
                "running, or refusing our key?)"
            )

    def _lose_coordinator(self, why: str) -> None:
        """The coordinator is gone: exit (non-zero), or with ``reconnect`` register again."""
        if self.coordinator_lost or self._reconnect_pending:
            return
        if self.reconnect:
            log.warning(
                "rank %d: lost the coordinator at %s: %s; aborting this replica's requests and "
                "waiting to register again",
                self.state.rank,
                self.coordinator_address,
                why,
            )
            self._reconnect_pending = True
            return
        log.error(
            "rank %d: lost the coordinator at %s: %s; exiting",
            self.state.rank,
            self.coordinator_address,
            why,
        )
        self.coordinator_lost = True
        self.lost_reason = f"lost the coordinator at {self.coordinator_address}: {why}"
        self.shutdown_requested = True

    def _check_drain(self) -> None:
        """Draining: leave at the drain's end without a STOP, or once the coordinator has
        been silent for DRAIN_SILENCE_S (it died: torchrun is tearing the world down after
        another rank failed, and no STOP will ever come)."""
        now = time.monotonic()
        silent = now - max(self._last_heard, self._drain_started)  # heartbeats are answered
        if now <= self.drain_deadline and silent <= DRAIN_SILENCE_S:
            return
        if not self.shutdown_requested:
            why = (
                "no STOP by the end of the drain"
                if silent <= DRAIN_SILENCE_S
                else (f"the coordinator has been silent for {silent:.1f} s")
            )
            log.warning("rank %d: %s; exiting", self.state.rank, why)
        self.shutdown_requested = True

    def _await_join(self) -> None:
        """Joined replicas, not yet answered: report the join once the coordinator spoke, or
        give up (exit) once ``join_timeout_s`` passed without a word."""
        if self._answered:
            self.joined = True
            self._last_heard = time.monotonic()
            if self.on_joined is not None:
                self.on_joined()
            return
        if time.monotonic() > self._join_deadline and not self.coordinator_lost:
            self.lost_reason = (
                f"could not reach the coordinator at {self.coordinator_address} within "
                f"{self.join_timeout_s:g} s (is it running there, and does it accept our key?)"
            )
            log.error("rank %d: %s; exiting", self.state.rank, self.lost_reason)
            self.coordinator_lost = True
            self.shutdown_requested = True

    def _not_known(self) -> None:
        """The coordinator answers us as a stranger: it restarted at the same address, or it
        declared this replica dead. Its requests are no longer ours: register afresh (joined
        replicas only; at most once a second)."""
        if self.coordinator_timeout_s is None or self._reconnect_pending:
            return
        if time.monotonic() - self._registered_at < 1.0:
            return
        log.warning(
            "rank %d: the coordinator at %s does not know this replica; registering again",
            self.state.rank,
            self.coordinator_address,
        )
        self._reconnect_pending = True

    def _register_again(self, inputs: StepInputs) -> None:
        """Drop every request (the old coordinator's), then connect and REGISTER afresh."""
        self._reconnect_pending = False
        self.joined = self._answered = False
        engine = self.engine
        for request_id in [r.request_id for r in engine.waiting] + list(engine.active):
            inputs.signals += [ABORT_SIGNAL, request_id]
            # The new coordinator numbers its requests afresh: an outcome of an old one must
            # never reach it, where the same id may be a request of its own.
            self._silenced.add(request_id)
        if self.paused:
            inputs.signals.append(int(Headers.UNPAUSE))
        if self.suspended:
            inputs.signals.append(int(Headers.RESUME))
        self.socket.close(0)
        self.context.term()
        self._last_heard = time.monotonic()
        self._next_heartbeat = 0.0
        self.identity = joined_identity(self.state.dp_rank)
        self._connect(self.coordinator_address)
        if self._wake_r is not None:
            self.poller.register(self._wake_r, zmq.POLLIN)

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM ask for a clean shutdown; a wake-up socket interrupts the idle poll."""
        if self.state.is_tp_coordinator:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            self.poller.register(self._wake_r, zmq.POLLIN)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.drain_s is None or self.drain_deadline is not None:
            log.info("rank %d: signal %d, shutting down", self.state.rank, signum)
            self.shutdown_requested = True
            return
        log.info(
            "rank %d: signal %d, serving while the coordinator drains (%g s at most)",
            self.state.rank,
            signum,
            self.drain_s,
        )
        self._drain_started = time.monotonic()
        self.drain_deadline = self._drain_started + self.drain_s
        if self.on_drain is not None:
            self.on_drain()

    def request_shutdown(self) -> None:
        """Ask the loop to end at its next step (safe from another thread)."""
        self.shutdown_requested = True

    def close(self) -> None:
        if self._step_heartbeat is not None:
            self._step_heartbeat.close()
            self._step_heartbeat = None
        if self._wake_w is not None:
            signal.set_wakeup_fd(-1)
            self._wake_w.close()
            self._wake_r.close()
            self._wake_w = self._wake_r = None
        if self.socket is not None:
            self.socket.close()
            self.context.term()
            self.socket = None

    # ----------------------------------------------------------------- loop
    @property
    def suspended(self) -> bool:
        """SUSPEND/RESUME change the engine's state; the replica's is the engine's."""
        return self.engine.suspended

    @property
    def runnable(self) -> bool:
        """Whether the next step has computation to do."""
        halted = self.paused or self.suspended or self.stop_received
        return self.engine.has_work and not halted

    def poll_timeout_ms(self) -> int:
        """0 (drain without blocking) while there is work, else block up to the idle timeout."""
        return 0 if (self.runnable or self.shutdown_requested) else self.idle_timeout_ms

    def run(self) -> None:
        """Serve until STOP_ACK (after STOP) or a shutdown request; collective over the group."""
        while not self.done:
            self.run_once()

    def run_once(self) -> StepResult | None:
        """One iteration: gather (TP rank 0), broadcast, apply, step, reply."""
        inputs = self._collect() if self.state.is_tp_coordinator else None
        inputs = self.broadcaster.exchange(inputs)
        self._apply(inputs)
        if self.done or not self.runnable:
            return None
        healthy = self.guard.healthy
        if self._step_heartbeat is None:
            outcome = self.guard.step()
        else:
            self._step_heartbeat.begin()
            try:
                outcome = self.guard.step()
            finally:
                self._step_heartbeat.end()
        result = outcome.result
        self.steps += 1
        self.generated_tokens += result.tokens
        self.processed_tokens += result.tokens + result.prefill_tokens
        if self.guard.healthy != healthy:
            self._next_heartbeat = 0.0  # tell the coordinator at once
            self._next_probe = time.monotonic() + self.probe_interval_s
        if self.socket is not None:
            for request_id, message in outcome.failed:
                if request_id != PROBE_REQUEST_ID:
                    self._send_error(request_id, ErrorCode.ENGINE_FAILED, message)
            self._reply(result)
        return result

    def _collect(self) -> StepInputs:
        inputs = StepInputs()
        events = dict(self.poller.poll(self.poll_timeout_ms()))
        if self._wake_r is not None and self._wake_r in events:
            try:
                while self._wake_r.recv(64):
                    pass
            except BlockingIOError:
                pass
        if self.socket in events:
            while True:
                try:
                    frame = self.socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._parse(frame, inputs)
            # POLLIN on a ZMQ socket means a whole message is waiting: noted once per drain.
            self._heard_from_coordinator = True
            self._last_heard = time.monotonic()
        joined = self.coordinator_timeout_s is not None
        talking = self._heard_from_coordinator or joined or self.drain_deadline is not None
        if self.heartbeat_interval_s is not None and talking:
            self._maybe_heartbeat()
        if joined and not self.stop_received:
            if not self.joined:
                self._await_join()
            else:
                silent = time.monotonic() - self._last_heard
                if silent > self.coordinator_timeout_s:
                    self._lose_coordinator(
                        f"no message and no answer to our heartbeats for {silent:.1f} s"
                    )
            if self._reconnect_pending and not self.shutdown_requested:
                self._register_again(inputs)
        if self.drain_deadline is not None:
            self._check_drain()
        if self.coordinator_alive is not None and not self.coordinator_alive():
            if not self.stop_received and self.drain_deadline is None:  # else it is expected
                log.error("rank %d: the coordinator process died", self.state.rank)
                self.coordinator_lost = True
            self.shutdown_requested = True
        if self.shutdown_requested:
            inputs.signals.append(SHUTDOWN_SIGNAL)
        elif not self.guard.healthy:
            self._maybe_probe(inputs)
        return inputs

    def _maybe_probe(self, inputs: StepInputs) -> None:
        """Unhealthy and idle: every probe interval, a one-token request of our own (never
        replied to) runs through the group; its success makes the replica healthy again."""
        now = time.monotonic()
        halted = self.paused or self.suspended or self.stop_received
        if self.engine.has_work or halted or inputs.requests or now < self._next_probe:
            return
        self._next_probe = now + self.probe_interval_s
        params = SamplingParams(temperature=0.0, top_k=1, num_tokens_to_generate=1)
        inputs.requests.append(NewRequest(PROBE_REQUEST_ID, [0], params, 0))

    def load_report(self, block_events: bool = True) -> dict[str, Any]:
        """What this replica tells the coordinator in a HEARTBEAT: load, prefix-cache stats
        and (``block_events``: between steps only, never from the step-heartbeat thread)
        the KV blocks stored and evicted since the last report."""
        engine = self.engine
        blocks = engine.blocks
        free_kv = min(
            len(engine.free_slots) * engine.max_seq_len, blocks.available * blocks.block_size
        )
        report = {
            "data_parallel_rank": self.state.dp_rank,
            "queued": len(engine.waiting),
            "active": len(engine.active),
            "free_slots": len(engine.free_slots),
            "free_kv_tokens": free_kv,
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
            # Cumulative, so the coordinator can tell which progress its replies did not show.
            "processed_tokens": self.processed_tokens,
            "paused": self.paused,
            "suspended": self.suspended,
            "healthy": self.guard.healthy,  # False: its model steps keep failing
            "failed_steps": self.guard.failed_steps,
            **blocks.stats(),
        }
        if block_events:
            report.update(blocks.drain_events())
        if self.coordinator_timeout_s is not None:
            report["heartbeat_reply"] = True  # a re-registration by HEARTBEAT keeps asking
        return report

    def _beat_during_step(self, running_s: float) -> None:
        """From the step-heartbeat thread, while a step runs (the loop leaves the socket
        alone then): the same HEARTBEAT, once the coordinator has spoken, never blocking."""
        if self.socket is None or not (
            self._heard_from_coordinator or self.coordinator_timeout_s is not None
        ):
            return
        report = self.load_report(block_events=False)
        report["step_running_s"] = round(running_s, 3)
        with contextlib.suppress(zmq.Again):
            self.socket.send(encode([Headers.HEARTBEAT, report]), zmq.NOBLOCK)

    def _maybe_heartbeat(self) -> None:
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_interval_s
            self._send([Headers.HEARTBEAT, self.load_report()])

    def _parse(self, frame: bytes, inputs: StepInputs) -> None:
        try:
            message = decode(frame)
        except ProtocolError as exc:
            log.warning("engine %d: dropped a bad frame: %s", self.state.dp_rank, exc)
            return
        header = message[0]
        if header == Headers.ERROR and len(message) == 4 and message[2] == "not_connected":
            self._not_known()  # spoken to, but as a stranger: not joined
            return
        self._answered = True
        if header == Headers.SUBMIT_REQUEST:
            self._parse_request(message, inputs)
        elif header == Headers.ABORT and len(message) == 2 and type(message[1]) is int:
            inputs.signals += [ABORT_SIGNAL, message[1]]
        elif header == Headers.HEARTBEAT:
            pass  # the coordinator's answer to ours: it is alive (noted by _collect)
        elif header in _FORWARDED_SIGNALS:
            inputs.signals.append(int(header))
        else:
            log.warning("engine %d: ignored message %r", self.state.dp_rank, header)

    def _parse_request(self, message: list[Any], inputs: StepInputs) -> None:
        if len(message) != 4 or type(message[1]) is not int:
            log.warning("engine %d: malformed SUBMIT_REQUEST", self.state.dp_rank)
            if len(message) > 1 and type(message[1]) is int:
                self._send_error(message[1], ErrorCode.MALFORMED, "SUBMIT_REQUEST needs 3 fields")
            return
        request_id, prompt, raw_params = message[1:]
        try:
            params = SamplingParams.deserialize(raw_params)
        except ProtocolError as exc:
            self._send_error(request_id, exc.code, str(exc))
            return
        except TypeError as exc:
            self._send_error(request_id, ErrorCode.INVALID_REQUEST, str(exc))
            return
        if not isinstance(prompt, list):
            self._send_error(request_id, ErrorCode.INVALID_REQUEST, "prompt must be token ids")
            return
        new = NewRequest(request_id, prompt, params, 0)
        problem = self.engine.check_request(prompt, InferenceEngine.token_budget(new))
        if problem is not None:
            self._send_error(request_id, ErrorCode.INVALID_REQUEST, problem)
            return
        new.seed = choose_seed(params.seed, prompt, self.deterministic_mode)
        inputs.requests.append(new)

    def _unsilenced(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``records`` without those of silenced requests (a final record ends the silence)."""
        kept = []
        for record in records:
            request_id = record["requests"][0]["request_id"]
            if request_id not in self._silenced:
                kept.append(record)
            elif request_id != PROBE_REQUEST_ID:
                self._silenced.discard(request_id)
        return kept

    def _send_error(self, request_id: int, code: ErrorCode, message: str) -> None:
        if request_id in self._silenced:
            if request_id != PROBE_REQUEST_ID:
                self._silenced.discard(request_id)
            return
        self._send([Headers.ERROR, request_id, code.value, message])

    def _apply(self, inputs: StepInputs) -> None:
        """Apply one step's inputs; identical on every rank of the group."""
        for new in inputs.requests:
            try:
                self.engine.add_request(new)
            except ValueError as exc:
                if self.socket is not None:
                    self._send_error(new.request_id, ErrorCode.INVALID_REQUEST, str(exc))
        signals = inputs.signals
        i = 0
        while i < len(signals):
            sig = signals[i]
            if sig == ABORT_SIGNAL and i + 1 < len(signals):
                self.engine.abort(signals[i + 1])
                i += 2
                continue
            self._apply_signal(sig)
            i += 1

    def _apply_signal(self, sig: int) -> None:
        if sig == SHUTDOWN_SIGNAL or sig == Headers.STOP_ACK:
            self.done = True
        elif sig == Headers.PAUSE:
            self.paused = True
            if self.socket is not None:
                self._send([Headers.PAUSE_ACK])
        elif sig == Headers.UNPAUSE:
            self.paused = False
        elif sig == Headers.SUSPEND:
            self.engine.suspend()
        elif sig == Headers.RESUME:
            self.engine.resume()
        elif sig == Headers.STOP:
            self.stop_received = True
            if self.socket is not None:
                self._send([Headers.STOP_ACK])

    def _reply(self, result: StepResult) -> None:
        if result.finished:
            result.finished = self._unsilenced(result.finished)
        if result.partial and len(self._silenced) > 1:  # probes never stream
            result.partial = [p for p in result.partial if p[0] not in self._silenced]
        if result.partial:
            self._send([Headers.PARTIAL_REPLY, result.partial])
        if result.finished:
            self._send([Headers.ENGINE_REPLY, result.finished])
