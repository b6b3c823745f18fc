"""Which final result answers a request that failed over: the first one, wherever it came from.

A request whose engine was declared dead may still finish there (the engine only paused) and,
resubmitted, elsewhere too: the first final record to arrive answers it, from either engine,
unless the client already saw tokens of it from another one (a stream goes on only where it
started) or the record is the abort the coordinator asked for. The engine still holding the
request is then told to ABORT it; every later record is dropped (engine_handlers.py). These
are the slow path of a reply: the records of the engine holding their request never get here.
"""

from __future__ import annotations

from collections.abc import Callable

from ..protocol import Headers
from .engines import EngineRegistry
from .requests import RequestTable
from .wire import encode


def wins_from_elsewhere(requests: RequestTable, request_id: int, record: dict) -> bool:
    """Whether a final record from an engine that no longer holds its request is still its
    first final result: in flight and failed over, nothing of it relayed from another engine,
    and no abort."""
    if request_id not in requests.failovers or requests.relayed(request_id):
        return False
    return record["requests"][0].get("status") != "ABORTED"


def abort_losers(
    registry: EngineRegistry, send_quietly: Callable[[bytes, bytes], None], late: dict[int, bytes]
) -> None:
    """The first results of ``late`` (request id -> the engine still holding it) came from
    elsewhere: stop them where they still run (engines of ours; their records are dropped)."""
    abort = int(Headers.ABORT)
    for request_id, holder in late.items():
        if registry.speaks_ours(holder):
            send_quietly(holder, encode([abort, request_id]))
