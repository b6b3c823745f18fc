"""The coordinator's engine registry: who is registered, in which order, and who fell silent.

Registration is one empty frame (Megatron: identity ``b"mp-coord-<dp_rank>"``, whose rank is
parsed for ``deterministic_mode``; 0.16 and 0.19 register alike, so the coordinator's
``megatron_engines`` option says which version such an engine speaks: dialects.py) or
``[REGISTER, {"data_parallel_rank": int, "protocol": int}]`` (ours). ``order`` is the seed's ``identities_of_data_parallel_ranks``: the engines that
get requests. Engines of ours heartbeat; one silent for ``engine_timeout`` seconds is declared
dead by the coordinator, which then fails its requests over (failover.py). The registry
remembers the engines it declared dead (bounded): their late results may still be the first
(engine_handlers.py), and one that speaks the liveness contract (``rejoins``: its REGISTER
said its heartbeat interval) is asked to register again with what it holds, while an older
engine of ours may come back with a bare HEARTBEAT.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from ..protocol import Headers
from .control import State019
from .dialects import Dialect
from .liveness import SilenceClock
from .wire import DECODE_ERRORS, MEGATRON_IDENTITY, heartbeat_decoder, peek_header

logger = logging.getLogger("megatron_coord.coordinator")

_MAX_DEAD_REMEMBERED = 4096


class Engine:
    """What the coordinator knows about one registered engine (TP-coordinator)."""

    __slots__ = (
        "identity",
        "data_parallel_rank",
        "dialect",
        "ours",
        "arrival",
        "load",
        "info",
        "state_019",
        "rejoins",
    )

    def __init__(
        self, identity: bytes, rank: int | None, dialect: Dialect, arrival: int, info: dict | None
    ) -> None:
        self.identity = identity
        self.data_parallel_rank = rank
        self.dialect = dialect
        self.ours = dialect is Dialect.OURS
        self.state_019 = State019.RUNNING  # a 0.19 engine's control state (see control.py)
        self.arrival = arrival
        self.info = info  # its REGISTER fields (ours only)
        self.load: dict[str, Any] | None = None  # last HEARTBEAT report
        # It keeps the liveness contract (REGISTER_ACK): declared dead, it registers again
        # with what it holds (replica_rejoin.py) instead of coming back by HEARTBEAT.
        self.rejoins = info is not None and "heartbeat_interval" in info


class BadRegistration(ValueError):
    """A REGISTER frame whose fields are wrong."""


def parse_registration(
    identity: bytes, payload: bytes, megatron: Dialect = Dialect.MEGATRON_016
) -> tuple[int | None, Dialect, dict] | None:
    """(data-parallel rank, dialect, REGISTER fields) if ``payload`` registers an engine (an
    empty frame: a Megatron engine of version ``megatron``); None if it is no registration.
    Raises BadRegistration for a malformed REGISTER."""
    if payload == b"":
        match = MEGATRON_IDENTITY.match(identity)
        return (int(match.group(1)) if match else None), megatron, {}
    if peek_header(payload) != Headers.REGISTER:
        return None
    try:
        _, info = heartbeat_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise BadRegistration(str(exc)) from None
    rank = info.get("data_parallel_rank")
    if rank is not None and (type(rank) is not int or rank < 0):
        raise BadRegistration("data_parallel_rank must be a non-negative integer")
    return rank, Dialect.OURS, info


class EngineRegistry:
    """Registered engines, their routing order, heartbeat silence and the engines lost."""

    def __init__(self, engine_timeout: float, deterministic_mode: bool) -> None:
        self.engines: dict[bytes, Engine] = {}
        self.order: deque[bytes] = deque()  # identities_of_data_parallel_ranks
        self.deterministic_mode = deterministic_mode
        self._silence = SilenceClock(engine_timeout)
        self._last_seen: dict[bytes, float] = {}  # heartbeating engines -> last message time
        self._dead: dict[bytes, Engine] = {}  # declared dead, newest last (bounded)
        self._asked_back: set[bytes] = set()  # dead engines told to register again
        self.speaks_019: set[bytes] = set()  # engines of Megatron-core 0.19 (their SUBMIT differs)
        self.engines_lost = 0

    def __len__(self) -> int:
        return len(self.engines)

    def add(self, identity: bytes, rank: int | None, dialect: Dialect, info: dict | None) -> bool:
        """Register an engine; False (logged) if ``identity`` is registered already."""
        if identity in self.engines:
            logger.warning("engine %r registered twice; ignoring the second registration", identity)
            return False
        if any(rank is not None and e.data_parallel_rank == rank for e in self.engines.values()):
            logger.warning("two engines claim data-parallel rank %s", rank)
        arrival = len(self.engines) + self.engines_lost
        self.engines[identity] = Engine(identity, rank, dialect, arrival, info)
        if dialect is Dialect.MEGATRON_019:
            self.speaks_019.add(identity)
        logger.info("engine %r registered (dp rank %s)", identity, rank)
        return True

    def fix_order(self) -> None:
        """Set the routing order once the first engines registered (by rank in
        ``deterministic_mode``, else by arrival)."""
        self.order.extend(e.identity for e in sorted(self.engines.values(), key=self._order_key))

    def _order_key(self, engine: Engine) -> tuple:
        if self.deterministic_mode:
            rank = engine.data_parallel_rank
            return (rank is None, rank if rank is not None else 0, engine.arrival)
        return (engine.arrival,)

    def remove(self, identity: bytes) -> Engine | None:
        """Declare an engine dead: it leaves the registry and the order, and may come back."""
        engine = self.engines.pop(identity, None)
        if engine is None:
            return None
        self.engines_lost += 1
        self.speaks_019.discard(identity)
        self._dead[identity] = engine
        if len(self._dead) > _MAX_DEAD_REMEMBERED:
            self.forget_dead(next(iter(self._dead)))
        self._last_seen.pop(identity, None)
        if identity in self.order:
            self.order.remove(identity)
        return engine

    def speaks_ours(self, identity: bytes) -> bool:
        """Whether a registered engine takes our extensions (ABORT): Megatron's crash on them."""
        engine = self.engines.get(identity)
        return engine is not None and engine.ours

    def dead(self, identity: bytes) -> Engine | None:
        """The engine of ours that ``identity`` was, if it was declared dead."""
        engine = self._dead.get(identity)
        return engine if engine is not None and engine.ours else None

    def forget_dead(self, identity: bytes) -> None:
        """``identity`` came back (or is too old to remember)."""
        self._dead.pop(identity, None)
        self._asked_back.discard(identity)

    def first_ask_back(self, identity: bytes) -> bool:
        """Whether a dead engine is asked to register again for the first time (logged once)."""
        if identity in self._asked_back:
            return False
        self._asked_back.add(identity)
        return True

    # ---- heartbeats

    def heard_from(self, engine: Engine, now: float) -> None:
        """Any message from a heartbeating engine proves it alive."""
        if engine.identity in self._last_seen:
            self._last_seen[engine.identity] = now

    def heartbeat(self, engine: Engine, now: float) -> bool:
        """Note a HEARTBEAT (the engine is watched for silence from now on); whether the
        engine asked for an answer (``"heartbeat_reply": true`` in REGISTER or HEARTBEAT)."""
        self._last_seen[engine.identity] = now
        info = engine.info
        return (info is not None and info.get("heartbeat_reply") is True) or (
            engine.load.get("heartbeat_reply") is True
        )

    def next_deadline(self) -> float | None:
        """The earliest moment an engine could be declared dead for silence."""
        return self._silence.next_deadline(self._last_seen.values())

    def silent(self, now: float) -> list[bytes]:
        """Heartbeating engines not heard from for longer than the engine timeout."""
        if not self._last_seen:
            return []
        return self._silence.silent(self._last_seen, now)
