"""Weight-update rounds: one client's UPDATE_WEIGHTS to every replica, all or nothing.

A round (one at a time: a second UPDATE_WEIGHTS while one runs is refused with
``overloaded``, "an update is in progress", so a caller never waits behind an update it did not
ask for and always knows which one it got; it retries once the first answered):

1. the spec is checked (update_spec.py); an update while a Megatron engine (0.16 / 0.19,
   which cannot load weights) is registered, with no engine of ours, during a STOP or a
   shutdown, or naming an unknown ``abort_older_than`` is refused with an ERROR;
2. every registered replica of ours gets ``[UPDATE_WEIGHTS, update_id, spec_for_engine]``: the
   spec plus ``stale_versions`` (the versions known before ``abort_older_than``, in order) and,
   for the distributed source, its ``first_rank`` in the transfer group (the trainer ranks
   first, then the replicas by data-parallel rank, each as many ranks as its TP size) and the
   ``world_size``; the client is told these at once (WEIGHT_TRANSFER_READY) so the trainer
   joins the group;
3. each replica answers UPDATE_WEIGHTS_DONE; one that dies (failover.py tells us) or has not
   answered by the spec's ``timeout_s`` is failed; once every replica is accounted for, the
   version is published if and only if every one applied it, and the client gets one
   UPDATE_WEIGHTS_DONE with each replica's result and the failed ones named.

Requests keep flowing meanwhile: routed as usual (versions.py says which replicas serve, and
decides again when the round ends); each replica applies the update between two steps, its
requests in flight going on as the mode says. Nothing is queued or lost here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..protocol import ErrorCode, Headers, ProtocolError
from .dialects import Dialect
from .outbox import Outbox
from .state import CoordinatorState
from .update_spec import checked_spec
from .wire import DECODE_ERRORS, encode

logger = logging.getLogger("megatron_coord.coordinator")

update_decoder = msgspec.msgpack.Decoder(tuple[int, int | str, Any])
done_decoder = msgspec.msgpack.Decoder(tuple[int, int, dict[str, Any]])


@dataclass(eq=False)
class Round:
    """One update in progress."""

    update_id: int
    client: bytes
    client_request_id: Any
    spec: dict[str, Any]
    started: float
    deadline: float
    ranks: dict[bytes, int] = field(default_factory=dict)  # replica -> data-parallel rank
    results: dict[bytes, dict[str, Any] | None] = field(default_factory=dict)

    def waiting(self) -> list[bytes]:
        return [identity for identity, result in self.results.items() if result is None]


def replica_name(rank: Any, identity: bytes) -> str:
    return f"dp rank {rank} ({identity.hex()})"


class WeightUpdates:
    """Runs update rounds (see the module docstring); ``reroute(identity)`` re-decides whether
    an engine is routed to (engine_handlers.py, health and versions together) and
    ``version_changed(identity)`` tells the routing policy a replica's cached blocks are of
    other weights now."""

    def __init__(
        self,
        state: CoordinatorState,
        outbox: Outbox,
        reroute: Callable[[bytes], None],
    ) -> None:
        self.state = state
        self.outbox = outbox
        self._reroute = reroute
        self.round: Round | None = None
        self._next_id = 1
        state.versions_watcher = self.engine_left

    # ------------------------------------------------------------------ client side

    def on_update(self, client: bytes, payload: bytes) -> None:
        """``[UPDATE_WEIGHTS, client_request_id, spec]`` from a client of ours."""
        state = self.state
        if state.clients.get(client) is not Dialect.OURS:
            raise ProtocolError(ErrorCode.UNKNOWN_HEADER, "UPDATE_WEIGHTS needs our protocol")
        try:
            _, client_request_id, raw = update_decoder.decode(payload)
        except DECODE_ERRORS as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad UPDATE_WEIGHTS: {exc}") from None
        spec = checked_spec(raw)
        members = self._members()
        engine_spec = dict(spec, stale_versions=self._stale(spec))
        now = time.monotonic()
        update = Round(self._next_id, client, client_request_id, spec, now, now + spec["timeout_s"])
        self._next_id += 1
        engines = state.registry.engines
        members.sort(key=lambda i: (engines[i].data_parallel_rank or 0, engines[i].arrival))
        source = spec["source"]
        distributed = source["kind"] == "distributed"
        first = source["trainer_ranks"] if distributed else 0
        replicas = []
        for identity in members:
            engine = engines[identity]
            update.ranks[identity] = engine.data_parallel_rank
            update.results[identity] = None
            if distributed:
                tp = _tp_size(engine.info)
                rank = engine.data_parallel_rank
                replicas.append({"data_parallel_rank": rank, "first_rank": first, "tp_size": tp})
                first += tp
        self.round = update
        state.versions.in_round = set(members)
        header = int(Headers.UPDATE_WEIGHTS)
        for index, identity in enumerate(members):
            mine = dict(engine_spec)
            if distributed:
                mine.update(first_rank=replicas[index]["first_rank"], world_size=first)
            if not self.outbox.send(identity, encode([header, update.update_id, mine])):
                update.results[identity] = _failed("the replica is unreachable")
        logger.info(
            "weight update %d to %r (%s, mode %s): %d replica(s)",
            update.update_id,
            spec["version"],
            source["kind"],
            spec["mode"],
            len(members),
        )
        if distributed:
            ready = {
                "world_size": first,
                "trainer_ranks": list(range(source["trainer_ranks"])),
                "replicas": replicas,
            }
            message = [int(Headers.WEIGHT_TRANSFER_READY), client_request_id, ready]
            self.outbox.send(client, encode(message))
        self._maybe_finish()

    def _members(self) -> list[bytes]:
        """The replicas a new round updates; ProtocolError if none can be."""
        state = self.state
        if self.round is not None:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"an update is in progress (to {self.round.spec['version']!r}); retry once "
                "it is answered",
            )
        if state.control.stopping or state.shutdown.active:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the engines are stopping")
        engines = state.registry.engines
        theirs = [engines[i] for i in state.registry.order if not engines[i].ours]
        if theirs:
            names = ", ".join(f"dp rank {e.data_parallel_rank}" for e in theirs)
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"weights cannot be updated: {names} run(s) a Megatron-core engine, which "
                "cannot load new weights while serving",
            )
        members = [i for i in state.registry.order if engines[i].ours]
        if not members:
            raise ProtocolError(ErrorCode.NO_ENGINE, "no engine is registered to update")
        return members

    def _stale(self, spec: dict[str, Any]) -> list[str]:
        """The versions the staleness bound aborts (see the module docstring)."""
        older = spec["abort_older_than"]
        if older is None:
            return []
        versions = self.state.versions
        if older == spec["version"] and older not in versions.history:
            return list(versions.history)
        stale = versions.stale_before(older)
        if stale is None:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"bad update spec: abort_older_than {older!r} is no version this coordinator "
                f"knows (known: {', '.join(map(repr, versions.history[-8:])) or 'none'})",
            )
        return stale

    # ------------------------------------------------------------------ engine side

    def on_done(self, engine: Any, payload: bytes) -> None:
        """``[UPDATE_WEIGHTS_DONE, update_id, result]`` from a replica."""
        try:
            _, update_id, result = done_decoder.decode(payload)
        except DECODE_ERRORS as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad UPDATE_WEIGHTS_DONE: {exc}") from None
        identity = engine.identity
        self.version_reported(identity, result.get("version"))
        update = self.round
        if update is None or update.update_id != update_id or identity not in update.results:
            logger.warning(
                "engine %r: UPDATE_WEIGHTS_DONE of update %r, which is not running (late?)",
                identity,
                update_id,
            )
            self._reroute(identity)
            return
        if update.results[identity] is None:
            update.results[identity] = result
        self._maybe_finish()

    def version_reported(self, identity: bytes, version: Any) -> None:
        """A replica said its version (heartbeat, DONE): a new one makes its cached blocks
        other weights' (the routing policy forgets them)."""
        if self.state.versions.reported(identity, version):
            self.state.routing_policy.on_version_change(identity)

    def engine_left(self, identity: bytes) -> None:
        """An engine was declared dead (failover.py): failed in the round it was in."""
        self.state.versions.forget(identity)
        update = self.round
        if update is not None and update.results.get(identity, {}) is None:
            update.results[identity] = _failed("the replica died during the update")
            self._maybe_finish()

    def next_deadline(self) -> float | None:
        return None if self.round is None else self.round.deadline

    def check_deadline(self, now: float) -> None:
        """The round's time is up: the replicas that did not answer have failed."""
        update = self.round
        if update is None or now < update.deadline:
            return
        for identity in update.waiting():
            update.results[identity] = _failed(
                f"no answer within the update's timeout ({update.spec['timeout_s']:g} s)"
            )
        self._maybe_finish()

    # ------------------------------------------------------------------ the end

    def _maybe_finish(self) -> None:
        update = self.round
        if update is None or update.waiting():
            return
        self.round = None
        state = self.state
        versions = state.versions
        version = update.spec["version"]
        replicas, failed = [], []
        for identity, result in update.results.items():
            rank = update.ranks[identity]
            entry = {"data_parallel_rank": rank, "identity": identity.hex(), **result}
            replicas.append(entry)
            if not result.get("ok"):
                failed.append(f"{replica_name(rank, identity)}: {result.get('error') or 'failed'}")
        published = not failed and bool(replicas)
        duration = time.monotonic() - update.started
        if published:
            versions.publish(version)
            versions.updates_done += 1
        else:
            versions.updates_failed += 1
        versions.last_update_s = duration
        versions.in_round = set()
        error = None
        if failed:
            error = f"version {version!r} not published: {len(failed)} of {len(replicas)} "
            error += "replica(s) failed: " + "; ".join(failed)
            logger.error("weight update %d: %s", update.update_id, error)
        else:
            logger.info(
                "weight update %d: %r published in %.3f s", update.update_id, version, duration
            )
        done = {
            "version": version,
            "published": published,
            "duration_s": duration,
            "replicas": replicas,
            "failed": [f.split(":", 1)[0] for f in failed],
            "error": error,
        }
        message = [int(Headers.UPDATE_WEIGHTS_DONE), update.client_request_id, done]
        self.outbox.send(update.client, encode(message))
        for identity in list(state.registry.order):
            self._reroute(identity)

    # ------------------------------------------------------------------ 0.19's epochs

    def set_epoch(self, epoch: int) -> None:
        """A 0.19 client's SET_GENERATION_EPOCH relayed to our engines: their tokens from now
        on are of version ``str(epoch)``, and so is the published version."""
        state = self.state
        version = str(epoch)
        message = encode([int(Headers.SET_GENERATION_EPOCH_OURS), epoch])
        versions = state.versions
        for identity in state.registry.order:
            if state.registry.engines[identity].ours and self.outbox.send(identity, message):
                versions.pending[identity] = version
        versions.publish(version)


def _failed(error: str) -> dict[str, Any]:
    return {"ok": False, "version": None, "error": error, "duration_s": None}


def _tp_size(info: dict | None) -> int:
    size = (info or {}).get("tensor_parallel_size")
    return size if type(size) is int and size >= 1 else 1
