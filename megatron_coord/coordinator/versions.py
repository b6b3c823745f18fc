"""Which weights the coordinator serves: the published version and each replica's own.

The rule for routing (``serves``), kept simple on purpose: until a version is published every
replica is routed to (as before updates existed); once one is, only replicas whose version is
the published one get new requests, so a client never gets tokens of two weight versions from
two replicas after an update said which one is served. Two exceptions keep serving smooth:

* a replica in the update round now running is routed to while the round lasts (it applies
  the update at a step boundary; its requests go on, as their mode says), and the round's end
  decides: published, the replicas that applied it serve; not published (all or nothing), those
  that applied it do not, those that refused before copying still serve the old version;
* a replica told to move to the published version (a 0.19 generation epoch: no weights
  change, nothing can fail) counts as moved until a heartbeat says otherwise, so the heartbeats
  sent before it stepped do not take it out of routing.

Megatron's engines (no version) are always routed to; the coordinator refuses an update while
any is registered (weight_updates.py). Health (a replica with mixed weights says
``healthy: false``) is checked apart, in engine_handlers.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False, slots=True)
class Versions:
    """Published version, its history, each replica's version and the update counters."""

    published: str | None = None
    # Every version label known, in order: the replicas' first versions, then publications
    # (abort_older_than's "older" is "earlier in this list").
    history: list[str] = field(default_factory=list)
    current: dict[bytes, str | None] = field(default_factory=dict)  # engines of ours only
    pending: dict[bytes, str] = field(default_factory=dict)  # told to move there (epoch)
    in_round: set[bytes] = field(default_factory=set)  # the running round's replicas
    updates_done: int = 0
    updates_failed: int = 0
    last_update_s: float | None = None

    def known(self, version: str | None) -> None:
        if version is not None and version not in self.history:
            self.history.append(version)
            if len(self.history) > 4096:  # bounded: the oldest labels matter least
                del self.history[0]

    def register(self, identity: bytes, info: dict[str, Any] | None) -> None:
        """An engine registered; ``info`` None: one of Megatron's (no version)."""
        if info is None:
            return
        version = info.get("weight_version")
        version = version if isinstance(version, str) else None
        self.current[identity] = version
        self.known(version)

    def forget(self, identity: bytes) -> None:
        self.current.pop(identity, None)
        self.pending.pop(identity, None)

    def reported(self, identity: bytes, version: Any) -> bool:
        """A replica's heartbeat or UPDATE_WEIGHTS_DONE named its version; whether it changed
        (its prefix-cache blocks are then of other weights)."""
        if identity not in self.current or not isinstance(version, str):
            return False
        if self.pending.get(identity) == version:
            del self.pending[identity]
        elif identity in self.pending:
            return False  # a report from before it moved: it moves at its next step
        changed = self.current[identity] != version
        self.current[identity] = version
        return changed

    def serves(self, identity: bytes) -> bool:
        """Whether new requests may go to ``identity`` as far as versions go (module doc)."""
        if self.published is None or identity not in self.current or identity in self.in_round:
            return True
        return self.pending.get(identity, self.current[identity]) == self.published

    def publish(self, version: str) -> None:
        self.published = version
        if version in self.history:
            self.history.remove(version)  # published again: now the newest
        self.known(version)

    def stale_before(self, version: str) -> list[str] | None:
        """The versions known before ``version``, in order (None: ``version`` is unknown)."""
        if version not in self.history:
            return None
        return self.history[: self.history.index(version)]

    def stats(self) -> dict[str, Any]:
        return {
            "weight_version": self.published,
            "updates_done": self.updates_done,
            "updates_failed": self.updates_failed,
            "last_update_s": self.last_update_s,
        }
