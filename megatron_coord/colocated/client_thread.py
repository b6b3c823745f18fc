"""A rank's InferenceClient on an asyncio loop of its own thread, called from synchronous code.

A training script is synchronous; the client is asyncio (``zmq.asyncio``). Each rank runs one
event loop in a daemon thread and hands it coroutines (``asyncio.run_coroutine_threadsafe``).
``generate`` submits a batch of prompts at once, so the coordinator spreads them over every
replica, and waits for every one of them to end: each accepted request gets its one final
answer (a record, or an error that ``generate`` raises after all have ended).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from ..client import InferenceClient
from ..client_requests import RequestError

# How often a waiting generate() checks that the serving loop still runs.
CHECK_INTERVAL_S = 0.5


class GenerationError(RuntimeError):
    """Some of a generate() call's prompts failed; ``errors`` maps their index to the error,
    ``records`` holds the others' records (None where failed)."""

    def __init__(self, errors: dict[int, BaseException], records: list[Any]) -> None:
        first = min(errors)
        super().__init__(
            f"{len(errors)} of {len(records)} prompt(s) failed; prompt {first}: {errors[first]}"
        )
        self.errors = errors
        self.records = records


class ClientThread:
    """An ``InferenceClient`` of ``address`` and the event loop it runs on."""

    def __init__(self, address: str, connect_timeout_s: float = 60.0, **client_options: Any):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="megatron-coord-client", daemon=True
        )
        self.thread.start()
        self.client = InferenceClient(address, connect_timeout=connect_timeout_s, **client_options)
        try:
            self.call(self.client.start(), connect_timeout_s + 5.0)
        except BaseException:
            self.close()
            raise

    def call(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        """Run ``coroutine`` on the loop; its result (or exception)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def do(self, fn: Callable[[InferenceClient], Any], timeout_s: float = 30.0) -> Any:
        """Run ``fn(client)`` on the loop (the client is the loop's alone); its result, awaited
        if it is awaitable."""

        async def run() -> Any:
            out = fn(self.client)
            if asyncio.isfuture(out) or asyncio.iscoroutine(out):
                out = await out
            return out

        return self.call(run(), timeout_s)

    def generate(
        self, prompts: list[Any], params: dict[str, Any], check: Callable[[], None]
    ) -> list[dict[str, Any]]:
        """Submit every prompt, wait for all; one record per prompt, in order. ``check`` runs
        while waiting (it raises if the serving side failed)."""

        async def submit_all() -> list[Any]:
            futures = []
            for prompt in prompts:
                try:
                    futures.append(self.client.add_request(prompt, params))
                except (ValueError, TypeError, RuntimeError, ConnectionError) as exc:
                    failed = self.loop.create_future()
                    failed.set_exception(exc)
                    futures.append(failed)
            return await asyncio.gather(*futures, return_exceptions=True)

        pending = asyncio.run_coroutine_threadsafe(submit_all(), self.loop)
        while True:
            try:
                outcomes = pending.result(CHECK_INTERVAL_S)
                break
            except concurrent.futures.TimeoutError:
                try:
                    check()
                except BaseException:
                    pending.cancel()
                    raise
        errors = {i: o for i, o in enumerate(outcomes) if isinstance(o, BaseException)}
        records = [None if isinstance(o, BaseException) else _flat(o) for o in outcomes]
        if errors:
            raise GenerationError(errors, records)
        return records

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the client and the loop (idempotent)."""
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError, AttributeError):
                self.do(lambda c: c.stop(), timeout_s)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout_s)
        if not self.thread.is_alive():
            self.loop.close()


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """The request of a finished record (Megatron's ``{"requests": [request]}`` shape), with
    the record's own fields (``generated_text``, ``latency``...) beside its own."""
    requests = record.get("requests")
    if isinstance(requests, list) and len(requests) == 1 and isinstance(requests[0], dict):
        out = {k: v for k, v in record.items() if k != "requests"}
        out.update(requests[0])
        return out
    return record


__all__ = ["ClientThread", "GenerationError", "RequestError"]
