"""A replica registering again keeps what it holds: it says so, and waits for the answer.

A replica declared dead while it lived (a long pause: GC, swapping, SIGSTOP), or one that lost
its coordinator for a while, registers again without dropping anything: its REGISTER lists the
requests it holds (``holds``, with the ``coordinator_id`` they belong to), and the
coordinator's REGISTER_ACK says which of them to drop (``drop``: moved to another replica,
ended, or of a coordinator that restarted since) and how many tokens of each adopted stream
its client already has (``streamed``). Until that answer the replica sends nothing of the
requests it listed: their final outputs are held back here, and their streamed tokens are sent
again from the coordinator's count, so no stream repeats a token and none misses one. Then the
adopted requests carry on, as if nothing had happened.

Pure bookkeeping, shared by the real replica (engine/server.py) and the fake one
(testing/fake_engine.py); how a replica aborts, streams and replies is its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    """What a REGISTER_ACK decided about the requests a re-registration listed."""

    drop: set[int] = field(default_factory=set)  # abort silently (outputs discarded)
    kept: set[int] = field(default_factory=set)  # adopted back: carry on
    outputs: list[Any] = field(default_factory=list)  # held-back final outputs of kept ones
    streamed: dict[int, int] = field(default_factory=dict)  # kept stream -> tokens relayed


class Rejoin:
    """The requests a re-registration listed, and their outputs held back until answered."""

    def __init__(self) -> None:
        self.coordinator_id: str | None = None  # whose request ids this replica holds
        self.awaiting: frozenset[int] | None = None  # listed, not yet answered (None: none)
        self._held: dict[int, list[Any]] = {}  # request id -> final outputs held back

    def fields(self, holding: Iterable[int], previous_identity: bytes | None) -> dict[str, Any]:
        """REGISTER fields of a (re-)registration: the ids held (``holding``, and any whose
        outputs are still held back) and whose they are; from now on their outputs wait."""
        holds = set(holding) | self._held.keys()
        self.awaiting = frozenset(holds) if holds else None
        if self.coordinator_id is None and not holds:
            return {}  # a first registration
        fields: dict[str, Any] = {"coordinator_id": self.coordinator_id, "holds": sorted(holds)}
        if previous_identity is not None:
            fields["previous_identity"] = previous_identity.hex()
        return fields

    def holds_back(self, request_id: int) -> bool:
        """Whether an output of ``request_id`` must wait for the coordinator's answer."""
        awaiting = self.awaiting
        return awaiting is not None and request_id in awaiting

    def keep(self, request_id: int, output: Any) -> None:
        """Hold back a final output (a record, an error) of a listed request."""
        self._held.setdefault(request_id, []).append(output)

    def hold_back(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The final ``records`` that may go now; those of listed requests are kept."""
        awaiting = self.awaiting
        if awaiting is None:
            return records
        sent = []
        for record in records:
            request_id = record["requests"][0]["request_id"]
            if request_id in awaiting:
                self.keep(request_id, record)
            else:
                sent.append(record)
        return sent

    def unlisted(self, partials: list[list[Any]]) -> list[list[Any]]:
        """The ``[request_id, tokens]`` chunks that may go now: a listed stream's tokens go
        again from the coordinator's count once it answers."""
        awaiting = self.awaiting
        if awaiting is None:
            return partials
        return [chunk for chunk in partials if chunk[0] not in awaiting]

    def answered(self, ack: dict[str, Any]) -> Answer | None:
        """Take the coordinator's REGISTER_ACK; what it decided about the listed requests
        (None: nothing was listed). A coordinator other than the one the requests belong to
        (it restarted) knows none of them: all are dropped."""
        previous, self.coordinator_id = self.coordinator_id, ack.get("coordinator_id")
        listed, self.awaiting = self.awaiting, None
        if listed is None:
            return None
        if previous is None or previous != self.coordinator_id:
            drop = set(listed)
        else:
            drop = {rid for rid in ack.get("drop") or () if rid in listed}
        answer = Answer(drop=drop, kept=set(listed) - drop)
        for request_id in drop:
            self._held.pop(request_id, None)
        for request_id in answer.kept:
            answer.outputs += self._held.pop(request_id, ())
        for item in ack.get("streamed") or ():
            if isinstance(item, list) and len(item) == 2 and item[0] in answer.kept:
                answer.streamed[item[0]] = item[1]
        return answer
