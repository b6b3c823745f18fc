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

The loop's parts live beside it: the socket, registration and losing the coordinator
(coordinator_link.py), the control signals, shutdown and drain (control.py), the HEARTBEAT load
reports (heartbeats.py, step_heartbeat.py), failed steps (step_guard.py) and weight updates
(weight_updates.py: an UPDATE_WEIGHTS, or a 0.19 generation epoch, reaches every rank as a
payload signal and is applied between two steps; heartbeats go on meanwhile).

A replica declared dead while it lived, or one that lost its coordinator, loses nothing: it
registers again listing what it holds, holds back those requests' outputs until the answer
(REGISTER_ACK), drops what the coordinator says moved or ended and carries on with the rest
(rejoining.py). A request resubmitted to it that it already holds is not an error: it keeps
the one it has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..parallel_state import ParallelState
from ..protocol import ErrorCode, Headers, ProtocolError, decode
from ..sampling_params import SamplingParams
from .control import FORWARDED_SIGNALS, ReplicaControl
from .coordinator_link import DEFAULT_JOIN_TIMEOUT_S, CoordinatorLink, engine_identity
from .engine import InferenceEngine, StepResult
from .heartbeats import Heartbeats, StepCounters
from .rejoining import Rejoining
from .sampling import choose_seed
from .step_guard import DEFAULT_MAX_STEP_FAILURES, DEFAULT_PROBE_INTERVAL_S, StepGuard
from .step_heartbeat import DEFAULT_MAX_STEP_S
from .tp_broadcast import (
    ABORT_SIGNAL,
    SHUTDOWN_SIGNAL,
    NewRequest,
    StepInputs,
    TPBroadcaster,
    payload_signal,
)
from .weight_updates import WeightUpdater

log = logging.getLogger(__name__)

# The request id of a replica's self-probes (coordinator request ids are never negative).
PROBE_REQUEST_ID = -2


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
        heartbeat_interval_fixed: bool = False,
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
        self.counters = StepCounters()
        # Control signals, shutdown requests and the drain on SIGTERM (control.py).
        self.control = ReplicaControl(engine, state.rank, drain_s, on_drain)
        # Weight updates, applied by every rank between two steps (weight_updates.py).
        self.updater = WeightUpdater(engine, state, self.guard.group)
        self.control.payload_handlers[int(Headers.UPDATE_WEIGHTS)] = self._on_update
        self.control.payload_handlers[int(Headers.SET_GENERATION_EPOCH_OURS)] = self._on_epoch
        # Requests whose outcome is never sent: our own probes, and those the coordinator
        # said to drop when we registered again.
        self._silenced: set[int] = {PROBE_REQUEST_ID}
        # Block events go out in heartbeats, so only the TP-coordinator keeps them.
        engine.blocks.record_events = state.is_tp_coordinator
        # The TP-coordinator's socket: registration, joining, losing the coordinator and
        # registering again (coordinator_link.py). Other ranks only hear the broadcast.
        self.link: CoordinatorLink | None = None
        if state.is_tp_coordinator:
            if coordinator_address is None:
                raise ValueError("the TP-coordinator needs the coordinator's address")
            self.link = CoordinatorLink(
                state,
                engine.blocks,
                coordinator_address,
                identity or engine_identity(state.dp_rank),
                self.control.request_shutdown,
                coordinator_alive=coordinator_alive,
                coordinator_timeout_s=coordinator_timeout_s,
                auth_keys=auth_keys,
                reconnect=reconnect,
                join_timeout_s=join_timeout_s,
                on_joined=on_joined,
                describe=self._describe_weights,
                heartbeat_interval_s=heartbeat_interval_s,
                heartbeat_interval_fixed=heartbeat_interval_fixed,
            )
        # HEARTBEAT load reports, also during long steps (heartbeats.py).
        self.heartbeats = Heartbeats(
            engine,
            state.dp_rank,
            self.counters,
            self.control,
            self.guard,
            self.link,
            heartbeat_interval_s,
            max_step_s,
            heartbeat_reply=coordinator_timeout_s is not None,
        )
        # Registering again with what it holds, REGISTER_ACK (rejoining.py).
        self.rejoining: Rejoining | None = None
        if self.link is not None:
            self.rejoining = Rejoining(
                engine, self.link, self.heartbeats, self.control, self._silenced
            )

    # ----------------------------------------------------------------- state
    # What the launch and tests read; the parts own it.
    @property
    def paused(self) -> bool:
        return self.control.paused

    @property
    def suspended(self) -> bool:
        """SUSPEND/RESUME change the engine's state; the replica's is the engine's."""
        return self.engine.suspended

    @property
    def stop_received(self) -> bool:
        return self.control.stop_received

    @property
    def done(self) -> bool:
        return self.control.done

    @property
    def coordinator_lost(self) -> bool:
        """The loop ended because the coordinator went away (the launch exits non-zero)."""
        return self.link is not None and self.link.lost

    @property
    def lost_reason(self) -> str | None:
        return None if self.link is None else self.link.lost_reason

    @property
    def refused(self) -> bool:
        """The coordinator refused this replica's settings (the launch exits with a
        configuration error)."""
        return self.link is not None and self.link.refused

    @property
    def steps(self) -> int:
        return self.counters.steps

    @property
    def generated_tokens(self) -> int:
        return self.counters.generated_tokens

    def load_report(self, block_events: bool = True) -> dict[str, Any]:
        """This replica's HEARTBEAT load report (heartbeats.py)."""
        return self.heartbeats.report(block_events)

    # ----------------------------------------------------------------- life cycle
    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM ask for a clean shutdown, or drain (control.py)."""
        self.control.install_signal_handlers(self.link)

    def request_shutdown(self) -> None:
        """Ask the loop to end at its next step (safe from another thread)."""
        self.control.request_shutdown()

    def close(self) -> None:
        self.heartbeats.close()
        self.control.close()
        if self.link is not None:
            self.link.close()

    # ----------------------------------------------------------------- loop
    @property
    def runnable(self) -> bool:
        """Whether the next step has computation to do."""
        return self.engine.has_work and not self.control.halted

    def poll_timeout_ms(self) -> int:
        """0 (drain without blocking) while there is work, else block up to the idle timeout
        or the next heartbeat, whichever comes first."""
        if self.runnable or self.control.shutdown_requested:
            return 0
        due = self.heartbeats.due_in_ms()
        return self.idle_timeout_ms if due is None else max(1, min(self.idle_timeout_ms, due))

    def run(self) -> None:
        """Serve until STOP_ACK (after STOP) or a shutdown request; collective over the group."""
        while not self.control.done:
            self.run_once()

    def run_once(self) -> StepResult | None:
        """One iteration: gather (TP rank 0), broadcast, apply, step, reply."""
        inputs = self._collect() if self.state.is_tp_coordinator else None
        inputs = self.broadcaster.exchange(inputs)
        self._apply(inputs)
        if self.control.done or not self.runnable:
            if self.engine.weights_broken is not None and self.link is not None:
                self._reply(StepResult(finished=self.engine.take_finished()))  # its aborts
            return None
        guard = self.guard
        healthy = guard.healthy
        during_steps = self.heartbeats.during_steps
        if during_steps is None:
            outcome = guard.step()
        else:
            during_steps.begin()
            try:
                outcome = guard.step()
            finally:
                during_steps.end()
        result = outcome.result
        self.counters.add(result)
        if guard.healthy != healthy:
            self.heartbeats.soon()  # tell the coordinator at once
            self._next_probe = time.monotonic() + self.probe_interval_s
        if self.link is not None:
            for request_id, message in outcome.failed:
                if request_id != PROBE_REQUEST_ID:
                    self._send_error(request_id, ErrorCode.ENGINE_FAILED, message)
            self._reply(result)
        return result

    def _collect(self) -> StepInputs:
        """TP-coordinator: this step's inputs from the socket, and the link's and the
        process's checks between steps (heartbeats, silence, drain, shutdown, probes)."""
        inputs = StepInputs()
        self.rejoining.begin_step(inputs)
        link = self.link
        control = self.control
        events = dict(link.poller.poll(self.poll_timeout_ms()))
        control.clear_wakeups(events)
        sock = link.socket
        if sock in events:
            parse = self._parse
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                parse(frame, inputs)
            # POLLIN on a ZMQ socket means a whole message is waiting: noted once per drain.
            link.note_heard()
        self.heartbeats.between_steps()
        if link.outside and not control.stop_received:
            link.watch()
        if link.reconnect_pending and not (control.shutdown_requested or control.stop_received):
            self.rejoining.register_again(inputs)
        if control.draining:
            control.check_drain(link.last_heard)
        link.watch_process(exit_expected=control.stop_received or control.draining)
        if control.shutdown_requested:
            inputs.signals.append(SHUTDOWN_SIGNAL)
        elif not self.guard.healthy:
            self._maybe_probe(inputs)
        return inputs

    def _maybe_probe(self, inputs: StepInputs) -> None:
        """Unhealthy and idle: every probe interval, a one-token request of our own (never
        replied to) runs through the group; its success makes the replica healthy again."""
        now = time.monotonic()
        halted = self.control.halted
        if self.engine.has_work or halted or inputs.requests or now < self._next_probe:
            return
        self._next_probe = now + self.probe_interval_s
        params = SamplingParams(temperature=0.0, top_k=1, num_tokens_to_generate=1)
        inputs.requests.append(NewRequest(PROBE_REQUEST_ID, [0], params, 0))

    def _parse(self, frame: bytes, inputs: StepInputs) -> None:
        try:
            message = decode(frame)
        except ProtocolError as exc:
            log.warning("engine %d: dropped a bad frame: %s", self.state.dp_rank, exc)
            return
        header = message[0]
        if header == Headers.ERROR and len(message) == 4 and message[2] == "not_connected":
            self.link.not_known()  # spoken to, but as a stranger: not joined
            return
        self.link.answered = True
        if header == Headers.SUBMIT_REQUEST:
            self._parse_request(message, inputs)
        elif header == Headers.REGISTER_ACK:
            self.rejoining.on_register_ack(message, inputs)
        elif header == Headers.ABORT and len(message) == 2 and type(message[1]) is int:
            inputs.signals += [ABORT_SIGNAL, message[1]]
        elif header == Headers.HEARTBEAT:
            pass  # the coordinator's answer to ours: it is alive (noted by _collect)
        elif header == Headers.UPDATE_WEIGHTS:
            self._parse_update(message, inputs)
        elif header == Headers.SET_GENERATION_EPOCH_OURS and len(message) == 2:
            if type(message[1]) is int:
                inputs.signals += payload_signal(header, message[1])
        elif header == Headers.SUSPEND and len(message) == 2 and isinstance(message[1], dict):
            inputs.signals += payload_signal(header, message[1])  # ours, with options
        elif header in FORWARDED_SIGNALS:
            inputs.signals.append(int(header))
        else:
            log.warning("engine %d: ignored message %r", self.state.dp_rank, header)

    def _parse_update(self, message: list[Any], inputs: StepInputs) -> None:
        """``[UPDATE_WEIGHTS, update_id, spec]``: to the group, applied between two steps."""
        if len(message) != 3 or type(message[1]) is not int:
            log.warning("engine %d: malformed UPDATE_WEIGHTS", self.state.dp_rank)
            return
        if not isinstance(message[2], dict):
            result = {"ok": False, "version": self.engine.weight_version, "duration_s": 0.0}
            result.update(error="the update spec must be a dict", aborted=0, recomputed=0)
            self.link.send([Headers.UPDATE_WEIGHTS_DONE, message[1], result])
            return
        inputs.signals += payload_signal(Headers.UPDATE_WEIGHTS, [message[1], message[2]])

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
        if not self.rejoining.deferred(new):
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
        error = [Headers.ERROR, request_id, code.value, message]
        if not self.rejoining.held_back(error):
            self.link.send(error)

    def _apply(self, inputs: StepInputs) -> None:
        """Apply one step's inputs; identical on every rank of the group. A request whose id
        is here already (resubmitted after a false death) keeps the one it has."""
        engine = self.engine
        duplicates = 0
        for new in inputs.requests:
            if engine.holds(new.request_id):
                duplicates += 1
                continue
            try:
                engine.add_request(new)
            except ValueError as exc:
                if self.link is not None:
                    self._send_error(new.request_id, ErrorCode.INVALID_REQUEST, str(exc))
        if duplicates and self.link is not None:
            log.info(
                "engine %d: %d request(s) sent again that it holds: kept the ones it has",
                self.state.dp_rank,
                duplicates,
            )
        self.control.apply(inputs.signals, None if self.link is None else self.link.send)

    def _reply(self, result: StepResult) -> None:
        if result.finished:
            result.finished = self._unsilenced(result.finished)
        if result.partial and len(self._silenced) > 1:  # probes never stream
            result.partial = [p for p in result.partial if p[0] not in self._silenced]
        self.rejoining.hold_back(result)  # registered again, not yet answered: they wait
        if result.partial:
            self.link.send([Headers.PARTIAL_REPLY, result.partial])
        if result.finished:
            self.link.send([Headers.ENGINE_REPLY, result.finished])

    # ----------------------------------------------------------------- weight updates
    def _describe_weights(self) -> dict[str, Any]:
        """What REGISTER says of this replica's weights and parallelism."""
        return {
            "weight_version": self.engine.weight_version,
            "tensor_parallel_size": self.state.tensor_parallel_size,
        }

    def apply_update(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Apply an update spec (any source) from inside the serving processes: every rank of
        the replica calls it at the same point between two ``run_once`` calls (a training
        loop sharing the model). The records of the requests it ends go to the coordinator;
        the UPDATE_WEIGHTS_DONE-shaped result is returned."""
        during_steps = self.heartbeats.during_steps
        if during_steps is not None:
            during_steps.begin()  # the update may take long: heartbeats go on meanwhile
        try:
            outcome = self.updater.apply(spec)
        finally:
            if during_steps is not None:
                during_steps.end()
        if outcome.finished and self.link is not None:
            self._reply(StepResult(finished=outcome.finished))
        self.heartbeats.soon()  # the new version, and the reset of the prefix cache
        return outcome.result

    def update_in_place(
        self, version: str, mode: str = "keep", stale_versions: list[str] | None = None
    ) -> dict[str, Any]:
        """The model's parameters were changed in place by their owner: move to ``version``
        (``apply_update`` with the in_place source; same calling rule)."""
        spec = {"version": version, "source": {"kind": "in_place"}, "mode": mode}
        spec["stale_versions"] = list(stale_versions or [])
        return self.apply_update(spec)

    def _on_update(self, payload: Any) -> None:
        """The payload signal of an UPDATE_WEIGHTS: apply, then answer UPDATE_WEIGHTS_DONE."""
        update_id, spec = payload
        result = self.apply_update(spec)
        if self.link is not None:
            self.link.send([Headers.UPDATE_WEIGHTS_DONE, update_id, result])

    def _on_epoch(self, epoch: Any) -> None:
        """A 0.19 client's SET_GENERATION_EPOCH: a version bump labelled ``str(epoch)`` with no
        weight change (in_place, mode keep); 0.19 acknowledges nothing."""
        result = self.update_in_place(str(epoch))
        if not result["ok"]:
            log.error("engine %d: generation epoch %r: %s", self.state.dp_rank, epoch, result)
