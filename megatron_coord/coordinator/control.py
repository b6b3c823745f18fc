"""The control signals clients relay to every engine, and their acknowledgements.

PAUSE, UNPAUSE, SUSPEND, RESUME and STOP go to every engine; PAUSE and STOP are acknowledged
by each (PAUSE_ACK, STOP_ACK), and once every live engine has acked, the coordinator tells every
client and engine. After a STOP nothing else is relayed (Megatron's engines assert that only
STOP_ACK follows it). An engine that joins later is put in the state the clients put the others
in; an engine that dies may complete a pending acknowledgement.

``ControlState`` only decides; the coordinator does the sending.
"""

from __future__ import annotations

import logging

from ..protocol import ErrorCode, Headers, ProtocolError

logger = logging.getLogger("megatron_coord.coordinator")

_AWAITED = {Headers.PAUSE: Headers.PAUSE_ACK, Headers.STOP: Headers.STOP_ACK}


class ControlState:
    """Pause / suspend / stop state and the acks each engine sent."""

    def __init__(self) -> None:
        self.paused = False
        self.suspended = False
        self.stopping = False  # STOP was relayed: engines accept nothing but STOP_ACK now
        self.acks: dict[Headers, set[bytes]] = {Headers.PAUSE_ACK: set(), Headers.STOP_ACK: set()}
        self.awaiting: set[Headers] = set()  # relayed PAUSE / STOP not acked by every engine yet

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

    def engine_left(self, identity: bytes, live: set[bytes]) -> list[Headers]:
        """The awaited acks an engine's departure completes: every live engine acked them
        (all of them, when no engine is left: nobody else will ever answer)."""
        for acks in self.acks.values():
            acks.discard(identity)
        return [h for h in sorted(self.awaiting) if live <= self.acks[h]]

    def done(self, header: Headers) -> None:
        """Every engine acknowledged ``header``; the clients are being told."""
        self.awaiting.discard(header)

    def catch_up(self) -> list[Headers]:
        """What a joining engine must be sent to match the others."""
        if self.stopping:
            return [Headers.STOP]
        return [Headers.PAUSE] * self.paused + [Headers.SUSPEND] * self.suspended
