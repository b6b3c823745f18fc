"""The control signals clients relay to every engine, and their acknowledgements.

PAUSE, UNPAUSE, SUSPEND, RESUME and STOP go to every engine; PAUSE and STOP are acknowledged
by each (PAUSE_ACK, STOP_ACK), and once every live engine has acked, the coordinator tells every
client and engine. After a STOP nothing else is relayed (Megatron's engines assert that only
STOP_ACK follows it). An engine that joins later is put in the state the clients put the others
in; an engine that dies may complete a pending acknowledgement.

Megatron-core 0.19's engines acknowledge nothing and assert that each signal is valid in their
state (PAUSE only while running, UNPAUSE and SUSPEND only when paused, RESUME only when
suspended, STOP only when paused or suspended: its ``state.py``). Each 0.19 engine is sent only
the signals its state allows (``State019``); a 0.19 client's signal that the coordinator's state
does not allow is ignored, as 0.19's own coordinator does. A 0.19 engine leaves a STOP round by
disconnecting (DISCONNECT or its connection closing).

``ControlState`` only decides; the coordinator does the sending.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from ..protocol import ErrorCode, Headers, ProtocolError

logger = logging.getLogger("megatron_coord.coordinator")

_AWAITED = {Headers.PAUSE: Headers.PAUSE_ACK, Headers.STOP: Headers.STOP_ACK}


class State019(enum.Enum):
    """Megatron-core 0.19's control states (its ``CoordinatorState``)."""

    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    STOPPING = "stopping"


# signal -> (the states it may be applied in, the state it leads to); 0.19's state.py.
TRANSITIONS_019 = {
    Headers.PAUSE: ({State019.RUNNING}, State019.PAUSED),
    Headers.UNPAUSE: ({State019.PAUSED}, State019.RUNNING),
    Headers.SUSPEND: ({State019.PAUSED}, State019.SUSPENDED),
    Headers.RESUME: ({State019.SUSPENDED}, State019.PAUSED),
    Headers.STOP: ({State019.PAUSED, State019.SUSPENDED}, State019.STOPPING),
}


def next_019(state: State019, header: Headers) -> State019 | None:
    """The state ``header`` leads to from ``state``; None if 0.19 does not allow it there."""
    allowed, new_state = TRANSITIONS_019[header]
    return new_state if state in allowed else None


class ControlState:
    """Pause / suspend / stop state and the acks each engine sent."""

    def __init__(self) -> None:
        self.paused = False
        self.suspended = False
        self.stopping = False  # STOP was relayed: engines accept nothing but STOP_ACK now
        self.acks: dict[Headers, set[bytes]] = {Headers.PAUSE_ACK: set(), Headers.STOP_ACK: set()}
        self.awaiting: set[Headers] = set()  # relayed PAUSE / STOP not acked by every engine yet
        self.state_019 = State019.RUNNING  # the state 0.19 clients' signals are checked against

    def relay(self, header: Headers) -> Headers | None:
        """A client's control signal, to be sent to every engine; returns the ack it awaits."""
        if self.stopping:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the engines are stopping")
        self.stopping = header == Headers.STOP
        if header in (Headers.PAUSE, Headers.UNPAUSE):
            self.paused = header == Headers.PAUSE
        elif header in (Headers.SUSPEND, Headers.RESUME):
            self.suspended = header == Headers.SUSPEND
        if header == Headers.UNPAUSE:
            self.acks[Headers.PAUSE_ACK].clear()
            self.awaiting.discard(Headers.PAUSE_ACK)
        awaited = _AWAITED.get(header)
        if awaited is not None:  # a new round: every engine acks it afresh
            self.acks[awaited].clear()
            self.awaiting.add(awaited)
        return awaited

    def ack(self, identity: bytes, header: Headers, live: set[bytes]) -> bool:
        """Count an engine's ack; True when every live engine has now acked an awaited one."""
        acks = self.acks[header]
        if identity in acks:
            logger.warning("engine %r acked %s twice", identity, header.name)
            return False
        acks.add(identity)
        return header in self.awaiting and live <= acks

    def engine_left(
        self, identity: bytes, awaited_from: Callable[[Headers], set[bytes]]
    ) -> list[Headers]:
        """The awaited acks an engine's departure completes: every engine ``awaited_from``
        names for it acked (all of them, when none is left: nobody else will ever answer)."""
        for acks in self.acks.values():
            acks.discard(identity)
        return [h for h in sorted(self.awaiting) if awaited_from(h) <= self.acks[h]]

    def done(self, header: Headers) -> None:
        """Every engine acknowledged ``header``; the clients are being told."""
        self.awaiting.discard(header)

    def allows_019(self, header: Headers) -> bool:
        """Whether a 0.19 client's ``header`` is valid in the coordinator's 0.19 state."""
        return next_019(self.state_019, header) is not None

    def relayed_019(self, header: Headers) -> None:
        """Follow 0.19's state machine after relaying ``header`` (a no-op where invalid)."""
        self.state_019 = next_019(self.state_019, header) or self.state_019

    def catch_up(self) -> list[Headers]:
        """What a joining engine must be sent to match the others."""
        if self.stopping:
            return [Headers.STOP]
        return [Headers.PAUSE] * self.paused + [Headers.SUSPEND] * self.suspended

    def catch_up_019(self) -> list[Headers]:
        """What a joining 0.19 engine is sent: PAUSE if the others are not running. Only that:
        it acknowledges nothing, so a SUSPEND or STOP right behind the PAUSE could reach it
        before it has paused, which it asserts against; it stays paused until UNPAUSE."""
        return [] if self.state_019 is State019.RUNNING and not self.paused else [Headers.PAUSE]
