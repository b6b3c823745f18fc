"""Control rounds: a signal relayed to every engine, and the end of its acknowledgement round.

``ControlState`` (control.py) decides; this module sends. A PAUSE or STOP round ends once every
engine it awaits has acknowledged (or left): then every client and engine is told, and after
STOP the coordinator's loop ends.
"""

from __future__ import annotations

from ..protocol import Headers
from .control import State019
from .dialects import Dialect
from .outbox import Outbox
from .state import CoordinatorState
from .wire import HEADER_ONLY


class ControlRounds:
    """Relay control signals to the engines and end their rounds."""

    def __init__(self, state: CoordinatorState, outbox: Outbox) -> None:
        self.state = state
        self.outbox = outbox

    def relay(self, header: Headers) -> None:
        """Send PAUSE/UNPAUSE/SUSPEND/RESUME/STOP to every engine, each in its protocol;
        a round with nobody to wait for ends at once. ProtocolError once engines stop."""
        state = self.state
        awaited = state.control.relay(header)
        state.control.relayed_019(header)
        for engine in state.registry.order:
            self.outbox.send_control(engine, header)
        if awaited is not None and not self.awaited_from(awaited):  # nobody to wait for
            self.all_acked(awaited)

    def awaited_from(self, ack: Headers) -> set[bytes]:
        """The engines whose ``ack`` (PAUSE_ACK / STOP_ACK) completes a round: every engine but
        0.19's, which acknowledge nothing; for STOP also the 0.19 engines sent it, which leave
        the round by disconnecting."""
        registry = self.state.registry
        engines = registry.engines
        return {
            i
            for i in registry.order
            if engines[i].dialect is not Dialect.MEGATRON_019
            or (ack is Headers.STOP_ACK and engines[i].state_019 is State019.STOPPING)
        }

    def all_acked(self, header: Headers) -> None:
        """Every live engine acknowledged PAUSE or STOP: tell every client and engine."""
        state = self.state
        send = self.outbox.send
        state.control.done(header)
        message = HEADER_ONLY[header]
        for client, dialect in list(state.clients.items()):
            if dialect is not Dialect.MEGATRON_019:  # 0.19 has no acks
                send(client, message)
        for identity in state.registry.order:
            if state.registry.engines[identity].dialect is not Dialect.MEGATRON_019:
                send(identity, message)
        if header == Headers.STOP_ACK:
            state.running = False
