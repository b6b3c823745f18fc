"""The requests of an ``InferenceClient`` in flight: who waits for each outcome, what to send
again after a lost coordinator, and what a stream still owes before its final record.

Each request has exactly one waiter: the future of ``add_request`` or the queue of a stream
(``add_request_streaming``), and exactly one outcome (a record, or an error) handed to it; the
rest of its bookkeeping (submission time, SUBMIT frame, abort sent) ends with that outcome.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

END = object()  # end of a streaming request's queue


class RequestError(Exception):
    """The coordinator or an engine refused or failed a request; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def stream_tail(
    request_id: int, record: dict[str, Any], streamed_tokens: int, streamed_text: str
) -> dict[str, Any] | None:
    """The partial result a stream still owes before its final record (None: nothing)."""
    try:
        request = record["requests"][0]
        tokens = request["generated_tokens"]
        text = request.get("generated_text")
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(tokens, list) and len(tokens) == 2 and tokens[0] == "tensor":
        tokens = tokens[1]  # Megatron's serialized tensor
    if not isinstance(tokens, list) or not isinstance(text, str):
        return None
    rest_tokens = tokens[streamed_tokens:]
    rest_text = text[len(streamed_text) :] if text.startswith(streamed_text) else ""
    if not rest_tokens and not rest_text:
        return None
    tail = {"request_id": request_id, "tokens": rest_tokens, "text": rest_text}
    for name in _PER_TOKEN_FIELDS:  # what the partials carried for their tokens, if asked
        values = request.get(name)
        if isinstance(values, list) and not (values and values[0] == "tensor"):
            tail[name] = values[streamed_tokens:]
    return tail


_PER_TOKEN_FIELDS = ("generated_log_probs", "generated_top_n_logprobs")


class RequestsInFlight:
    """Every request of one client that has not had its outcome yet, by request id.

    The tables are never rebound (the client exposes ``futures`` and ``submission_times`` under
    Megatron's names, ``completion_futures`` and ``request_submission_times``)."""

    def __init__(self) -> None:
        self.futures: dict[int, asyncio.Future] = {}
        self.submission_times: dict[int, float] = {}
        self.streams: dict[int, asyncio.Queue] = {}
        self.submits: dict[int, bytes] = {}  # SUBMIT frame of each request in flight
        self.partial: set[int] = set()  # streams that yielded a part: never resubmitted
        self.aborting: set[int] = set()  # aborts sent, reply not yet received: sent once

    def first_abort(self, request_id: int) -> bool:
        """Whether an ABORT of ``request_id`` should be sent: not if one is awaiting its reply
        (a stream closed after an explicit abort does not send a second one)."""
        if request_id in self.aborting:
            return False
        if request_id in self.futures or request_id in self.streams:
            self.aborting.add(request_id)
        return True

    def partly_streamed(self) -> list[int]:
        """The streams that already yielded a part (a lost coordinator fails them)."""
        return [r for r in self.streams if r in self.partial]

    def finish(self, request_id: int, record: dict[str, Any]) -> bool:
        """Hand the final ``record`` (with its ``latency``) over; False if nobody waits for it."""
        self.aborting.discard(request_id)
        self.submits.pop(request_id, None)
        self.partial.discard(request_id)
        started = self.submission_times.pop(request_id, None)
        if started is not None:
            record["latency"] = time.perf_counter() - started
        return self.hand_over(request_id, record, failed=False)

    def fail(self, request_id: Any, error: Exception) -> bool:
        """Hand ``error`` over as the request's outcome; False if nobody waits for it (a
        ``request_id`` that is no int never names a request of ours)."""
        if type(request_id) is int:
            self.aborting.discard(request_id)
            self.forget(request_id)
        return self.hand_over(request_id, error, failed=True)

    def forget(self, request_id: int) -> None:
        """Drop the SUBMIT frame, submission time and streamed mark of ``request_id``; its
        waiter is left alone (the caller hands it its outcome, or it ended already)."""
        self.submits.pop(request_id, None)
        self.partial.discard(request_id)
        self.submission_times.pop(request_id, None)

    def hand_over(self, request_id: Any, outcome: Any, failed: bool) -> bool:
        """Give a request's final outcome (record, or RequestError if ``failed``) to whoever
        waits for it: its future, or its stream (a record then ends the stream). False if
        nobody does."""
        future = self.futures.pop(request_id, None)
        if future is not None:
            if not future.done():
                if failed:
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            return True
        queue = self.streams.pop(request_id, None)
        if queue is None:
            return False
        queue.put_nowait(outcome)
        if not failed:
            queue.put_nowait(END)
        return True

    def abandon(self, stream_error: Exception) -> None:
        """The client stops: futures are cancelled and open streams end with ``stream_error``,
        so no reader waits forever for a record that can no longer arrive."""
        self.submits.clear()
        self.partial.clear()
        for future in self.futures.values():
            if not future.done():
                future.cancel()
        self.futures.clear()
        for queue in self.streams.values():
            queue.put_nowait(stream_error)
