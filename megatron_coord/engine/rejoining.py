"""The TP-coordinator registering again with what it holds, and acting on the answer.

The bookkeeping (what a re-registration listed, what waits for the answer) is
replica_rejoin.py's, shared with the fake replica; this is the real replica's part: what it
holds (the engine's requests, and those of the step being collected), REGISTER_ACK (the
heartbeat cadence, a refusal, the answer to a re-registration), dropping what the coordinator
says moved or ended (an ABORT through the group's broadcast, whose record is never sent; a
SUBMIT of the same id in the same step waits for the next one, so the abort comes first), the
held-back outputs, and the tokens each adopted stream's client does not have yet.
"""

from __future__ import annotations

import logging
from typing import Any

from ..protocol import Headers
from ..replica_rejoin import Answer, Rejoin
from .control import ReplicaControl
from .coordinator_link import CoordinatorLink
from .engine import InferenceEngine, StepResult
from .heartbeats import Heartbeats
from .tp_broadcast import ABORT_SIGNAL, NewRequest, StepInputs

log = logging.getLogger(__name__)


class Rejoining:
    """Registering again and REGISTER_ACK, for the serving loop (engine/server.py).

    ``silenced`` is the loop's set of requests whose outcome is never sent."""

    def __init__(
        self,
        engine: InferenceEngine,
        link: CoordinatorLink,
        heartbeats: Heartbeats,
        control: ReplicaControl,
        silenced: set[int],
    ) -> None:
        self.engine = engine
        self.link = link
        self.heartbeats = heartbeats
        self.control = control
        self.silenced = silenced
        self.rejoin = Rejoin()
        self._dropping: set[int] = set()  # aborted in the step being collected
        self._deferred: list[NewRequest] = []  # their SUBMITs, for the next step

    def begin_step(self, inputs: StepInputs) -> None:
        """A new step's inputs: the SUBMITs deferred from the last one (their ids' aborts
        were applied there)."""
        if self._deferred:
            inputs.requests, self._deferred = self._deferred, []
        self._dropping.clear()

    def deferred(self, new: NewRequest) -> bool:
        """Whether ``new`` waits for the next step (its id is being dropped in this one)."""
        if new.request_id not in self._dropping:
            return False
        self._deferred.append(new)
        return True

    def register_again(self, inputs: StepInputs) -> None:
        """Keep every request, undo a pause or a suspension (the coordinator that answers
        sends the state it wants), and register afresh under a new identity, listing what
        it holds: their outputs wait for the answer."""
        holding = set(self.engine.request_ids())
        holding.update(r.request_id for r in inputs.requests)
        holding.update(r.request_id for r in self._deferred)
        holding -= self.silenced
        inputs.signals += self.control.undo_halt()
        self.heartbeats.soon()
        self.link.register_again(self.rejoin.fields(holding, self.link.identity))

    def on_register_ack(self, message: list[Any], inputs: StepInputs) -> None:
        """REGISTER_ACK: the cadence to heartbeat at, or a refusal; after a re-registration,
        which held requests to drop (silently) and which to carry on with."""
        if len(message) != 2 or not isinstance(message[1], dict):
            log.warning("rank %d: malformed REGISTER_ACK", self.link.state.rank)
            return
        ack = message[1]
        if "refused" in ack:
            self.link.refuse(str(ack["refused"]))
            return
        interval = ack.get("heartbeat_interval")
        if isinstance(interval, (int, float)) and interval > 0:
            self.heartbeats.adopt(float(interval))
        answer = self.rejoin.answered(ack)
        if answer is not None:
            self._carry_on(answer, inputs)

    def _carry_on(self, answer: Answer, inputs: StepInputs) -> None:
        """Drop what the coordinator says; send the held-back outputs of the rest, and each
        adopted stream's tokens from what its client has."""
        engine = self.engine
        for request_id in answer.drop:
            if engine.holds(request_id):
                inputs.signals += [ABORT_SIGNAL, request_id]
                self.silenced.add(request_id)  # its aborted record is never sent
                self._dropping.add(request_id)
        fill = []
        for request_id, relayed in answer.streamed.items():
            running = engine.active.get(request_id)
            if running is not None and type(relayed) is int and running.streamed > relayed >= 0:
                fill.append([request_id, running.generated[relayed : running.streamed]])
        link = self.link
        if fill:
            link.send([Headers.PARTIAL_REPLY, fill])
        records = [o for o in answer.outputs if isinstance(o, dict)]
        for error in (o for o in answer.outputs if not isinstance(o, dict)):
            link.send(error)
        if records:
            link.send([Headers.ENGINE_REPLY, records])
        log.warning(
            "rank %d: registered again: %d request(s) kept, %d dropped (ended or moved elsewhere)",
            link.state.rank,
            len(answer.kept),
            len(answer.drop),
        )

    def hold_back(self, result: StepResult) -> None:
        """Registered again, not yet answered: the listed requests' records wait, and their
        streamed tokens go again from the coordinator's count once it answers."""
        rejoin = self.rejoin
        if rejoin.awaiting is not None:
            result.finished = rejoin.hold_back(result.finished)
            result.partial = rejoin.unlisted(result.partial)

    def held_back(self, error: list[Any]) -> bool:
        """Whether an ERROR for a listed request waits for the answer (kept)."""
        request_id = error[1]
        if not self.rejoin.holds_back(request_id):
            return False
        self.rejoin.keep(request_id, error)
        return True
