"""What the coordinator's parts share: the one view of its state that the handlers get.

The coordinator (coordinator.py) builds a ``CoordinatorState`` and hands it, with the outbox
(outbox.py) and the operations that end requests (endings.py) and control rounds
(control_rounds.py), to the message handlers; nothing else of the coordinator is theirs to
read or change. The loop writes ``now`` once per wake-up and reads ``running`` per message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .control import ControlState
from .dialects import Dialect
from .engines import EngineRegistry
from .limits import Limits
from .liveness import PeerMonitor
from .requests import RequestTable
from .routing import RoutingPolicy
from .shutdown import GracefulShutdown
from .text import TextCodec
from .versions import Versions


@dataclass(eq=False, slots=True)
class CoordinatorState:
    """The request table, the engines, the clients, control and shutdown state, the settings
    the handlers act on, and the clock of the current wake-up."""

    requests: RequestTable
    registry: EngineRegistry
    control: ControlState
    shutdown: GracefulShutdown
    monitor: PeerMonitor  # which peer's connection closed
    text: TextCodec
    limits: Limits
    data_parallel_size: int  # 0: engines join and leave at any time
    megatron_engines: Dialect  # what an engine registering with an empty frame speaks
    engine_timeout: float  # seconds of silence before a heartbeating engine is dead
    failover_wait: float  # seconds a dead engine's request waits when no engine is left
    wait_for_engine: float  # seconds a new request waits when no engine can take it
    clients: dict[bytes, Dialect] = field(default_factory=dict)  # identity -> its protocol
    now: float = field(default_factory=time.monotonic)  # the current wake-up's time
    running: bool = False  # False ends the loop (every engine acked STOP, or shut down)
    stranger_fd: int | None = None  # connection of the frame being handled, if its peer is new
    requests_resubmitted: int = 0
    # Which coordinator this is: a replica registering again holds request ids of this one
    # only if it names this (REGISTER_ACK; a restarted coordinator has another).
    coordinator_id: str = field(default_factory=lambda: os.urandom(8).hex())
    engines_rejoined: int = 0  # replicas declared dead (or that lost us) that came back
    requests_adopted: int = 0  # requests a returning replica still held and kept
    late_results_dropped: int = 0  # results of requests already answered, or moved elsewhere
    # None until the first engines registered (then a join is routed to at once).
    routing_policy: RoutingPolicy | None = None
    routes_by_tokens: bool = False  # the policy chooses from token ids (ROUTE_LATER)
    tracks_load: bool = False  # the policy is told of every submit, token and finish
    # The published weight version and each replica's (versions.py); the update round is
    # told of every engine declared dead (weight_updates.py).
    versions: Versions = field(default_factory=Versions)
    versions_watcher: Callable[[bytes], None] | None = None

    def route_with(self, policy: RoutingPolicy) -> None:
        """Start routing with ``policy`` (once the first engines registered)."""
        self.routing_policy = policy
        self.routes_by_tokens = policy.needs_tokens
        # Requests routed later are handed to the policy's on_submit then (client_handlers).
        self.tracks_load = policy.tracks_load or policy.needs_tokens
