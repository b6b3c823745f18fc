"""A replica that registers again gets back what it still holds (the coordinator's half of
replica_rejoin.py), and every engine of ours learns its heartbeat cadence (REGISTER_ACK).

A replica declared dead that lived (a long pause), or one that lost this coordinator for a
while, registers again with the ids of the requests it holds (REGISTER ``holds``), whose they
are (``coordinator_id``) and the identity it had (``previous_identity``). Each of them is:

* **adopted back** if it is this coordinator's and still waits for an engine (its engine was
  declared dead and nothing took it since: an orphan, or a stream that only its own replica can
  continue), or is held by the replica's previous identity: it moves to the new identity and
  the replica carries on with it, nothing recomputed, nothing resent;
* **dropped there** (``drop``) otherwise: it ended, it moved to another engine, or it belongs to
  another coordinator (this one restarted). The replica aborts it without a word.

REGISTER_ACK carries that answer, the coordinator's ``engine_timeout`` and the cadence to beat
at (liveness_contract.py), and is sent before anything else reaches the engine, so the replica
knows what it keeps before a new request comes; for each adopted stream it says how many tokens
the client already has, from where the replica sends the rest. Logged once per registration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..protocol import Headers
from .requests import ROUTE_LATER, UNROUTED
from .state import CoordinatorState
from .wire import encode

logger = logging.getLogger("megatron_coord.coordinator")


class Adoption:
    """REGISTER_ACK for engines that keep the liveness contract; adopting what they hold.

    ``send(identity, frame)`` is the outbox's; ``engine_gone(identity, reason)`` declares a
    replica's previous identity dead once its requests are adopted (failover.py)."""

    def __init__(
        self,
        state: CoordinatorState,
        send: Callable[[bytes, bytes], bool],
        engine_gone: Callable[[bytes, str], None],
    ) -> None:
        self.state = state
        self._send = send
        self._engine_gone = engine_gone

    def refuse(self, identity: bytes, why: str) -> None:
        """REGISTER_ACK to an engine that cannot keep the contract (it is not registered)."""
        logger.warning("refused the registration of engine %r: %s", identity, why)
        refusal = {"refused": why, "engine_timeout": self.state.engine_timeout}
        self._send(identity, encode([int(Headers.REGISTER_ACK), refusal]))

    def acknowledge(self, identity: bytes, info: dict[str, Any], cadence: float | None) -> None:
        """Send REGISTER_ACK to ``identity``, just registered (and routed to, if serving):
        what it held is adopted back or dropped there (see the module docstring)."""
        state = self.state
        holds = info.get("holds")
        holds = [r for r in holds if type(r) is int] if isinstance(holds, list) else []
        ours = info.get("coordinator_id") == state.coordinator_id
        previous = _identity(info.get("previous_identity")) if ours else None
        drop: list[int] = []
        streamed: list[list[int]] = []
        for request_id in holds:
            if ours and self._adopt(request_id, identity, previous):
                relayed = state.requests.relayed(request_id)
                if relayed is not None:
                    streamed.append([request_id, relayed])
            else:
                drop.append(request_id)
        if ours:
            state.engines_rejoined += 1
            state.requests_adopted += len(holds) - len(drop)
            logger.warning(
                "engine %r (dp rank %s) came back: %d request(s) it held adopted back, %d "
                "dropped there (ended or moved elsewhere)",
                identity,
                info.get("data_parallel_rank"),
                len(holds) - len(drop),
                len(drop),
            )
        elif holds:
            logger.warning(
                "engine %r holds %d request(s) of another coordinator: dropped there",
                identity,
                len(holds),
            )
        ack = {
            "coordinator_id": state.coordinator_id,
            "engine_timeout": state.engine_timeout,
            "heartbeat_interval": cadence,
            "drop": drop,
            "streamed": streamed,
        }
        self._send(identity, encode([int(Headers.REGISTER_ACK), ack]))
        # Its previous identity stays remembered as dead (what it sent before leaving may
        # still arrive), unless it still counts as alive: it left us before we noticed.
        if previous is not None and previous != identity and previous in state.registry.engines:
            self._engine_gone(previous, f"it registered again as {identity!r}")

    def _adopt(self, request_id: int, identity: bytes, previous: bytes | None) -> bool:
        """Move a request the returning replica holds to its new identity, if it still waits
        for an engine or is on the replica's previous identity."""
        state = self.state
        requests = state.requests
        engine = requests.engine_of.get(request_id)
        if engine is None or engine is UNROUTED or engine is ROUTE_LATER:
            return False  # ended, or never routed to it
        if engine in state.registry.engines and engine != previous:
            return False  # moved to another engine
        requests.move(request_id, engine, identity)
        requests.orphans.pop(request_id, None)
        requests.reserved.pop(request_id, None)
        if state.tracks_load:
            state.routing_policy.on_resubmit(engine, identity, request_id)
        return True


def _identity(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None
