"""Serving one HTTP inference request: its choices run concurrently through the coordinator,
answered as one JSON response or as server-sent events (OpenAI's streaming shape): deltas as
tokens arrive or -- where the answer needs the whole generation (log-probs, echo, best_of) --
each choice whole in one chunk. A client that disconnects, a deadline or a failed choice
cancels, and so aborts, everything still running."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from . import openai_protocol as oa
from .choices import Choice, answer_choices, token_totals
from .errors import openai_error, timeout_error
from .generation import ChoiceResult, GenerationError, run_choice
from .responses import ChoiceOut, ResponseFormat, usage
from .state import ServerState

log = logging.getLogger("megatron_coord.serving")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Disconnected(Exception):
    """The HTTP client went away before its answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    """Return when the HTTP client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def serve(
    state: ServerState,
    request: Request,
    endpoint: str,
    body: oa._SamplingFields,
    choices: list[Choice],
    fmt: ResponseFormat,
) -> Response:
    """Answer one inference request: as JSON, as a stream of deltas, or -- where the answer
    needs the whole generation (log-probs, echo, best_of) -- as a stream of whole choices."""
    start = time.monotonic()
    state.acquire(endpoint)
    if body.stream and body.streams_incrementally():
        return await serve_stream(state, request, endpoint, body, choices, fmt, start)
    try:
        results = await _run_unary(state, request, choices, body.stop)
    except GenerationError as exc:
        error, outcome = openai_error(exc)
        state.metrics.observe_outcome(endpoint, outcome)
        raise error from None
    except asyncio.TimeoutError:
        state.metrics.observe_outcome(endpoint, "timeout")
        raise timeout_error() from None
    except Disconnected:
        state.metrics.observe_outcome(endpoint, "aborted")
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    except Exception:
        state.metrics.observe_outcome(endpoint, "error")
        raise  # answered 500 by the catch-all handler
    finally:
        state.release()
    answer = answer_choices(state, body, choices, results)
    prompt_tokens, completion_tokens, cached = token_totals(choices, results)
    elapsed = time.monotonic() - start
    state.metrics.observe_success(endpoint, elapsed, prompt_tokens, completion_tokens)
    totals = usage(prompt_tokens, completion_tokens, cached)
    if body.stream:
        state.metrics.observe_ttft(endpoint, elapsed)  # the first token the client sees
        chunks = _whole_chunks(fmt, answer, totals, body.include_usage())
        return StreamingResponse(
            _sse_list(chunks), media_type="text/event-stream", headers=_SSE_HEADERS
        )
    return JSONResponse(fmt.response(answer, totals))


def _whole_chunks(
    fmt: ResponseFormat, answer: list[ChoiceOut], totals: dict[str, Any], include_usage: bool
) -> list[dict[str, Any]]:
    """A finished answer as stream chunks: each choice whole, then its finish."""
    chunks = fmt.opening_chunks([c.index for c in answer], include_usage)
    for choice in answer:
        chunks.append(fmt.whole_chunk(choice, include_usage))
        chunks.append(fmt.finish_chunk(choice.index, choice.finish_reason, include_usage))
    if include_usage:
        chunks.append(fmt.usage_chunk(totals))
    return chunks


async def _sse_list(chunks: list[dict[str, Any]]) -> AsyncIterator[str]:
    for chunk in chunks:
        yield _sse_data(chunk)
    yield "data: [DONE]\n\n"


async def _run_unary(
    state: ServerState, request: Request, choices: list[Choice], stops: list[str]
) -> list[ChoiceResult]:
    """Run every choice concurrently; the first failure, a disconnect or the deadline cancels
    (and so aborts) the rest."""
    tasks = [
        asyncio.ensure_future(run_choice(state.backend, c.prompt, c.params, stops)) for c in choices
    ]
    gathered = asyncio.gather(*tasks)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {gathered, watcher},
            timeout=state.opts.request_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if gathered in done:
            return gathered.result()
        if watcher in done:
            raise Disconnected
        raise asyncio.TimeoutError
    finally:
        watcher.cancel()
        gathered.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, watcher, return_exceptions=True)
        if gathered.done() and not gathered.cancelled():
            gathered.exception()  # retrieved: no "exception never retrieved" warning


@dataclass
class _Event:
    kind: str  # "delta" | "done" | "error"
    index: int
    text: str = ""
    result: ChoiceResult | None = None
    error: GenerationError | None = None


class _StreamRun:
    """The choices of one streaming request, running concurrently into one event queue.

    ``close`` is idempotent and does all the bookkeeping exactly once: it cancels (aborts) what
    still runs, frees the concurrency slot and counts the outcome.
    """

    def __init__(
        self,
        state: ServerState,
        endpoint: str,
        choices: list[Choice],
        stops: list[str],
        start: float,
    ) -> None:
        self.state = state
        self.endpoint = endpoint
        self.choices = choices
        self.stops = stops
        self.start = start
        self.deadline = state.deadline()
        self.queue: asyncio.Queue[_Event] = asyncio.Queue()
        self.results: dict[int, ChoiceResult] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.ttft_seen = False
        self.closed = False

    def begin(self) -> None:
        self.tasks = [asyncio.ensure_future(self._one(c)) for c in self.choices]

    async def _one(self, choice: Choice) -> None:
        def emit(text: str) -> None:
            self.queue.put_nowait(_Event("delta", choice.index, text))

        try:
            result = await run_choice(
                self.state.backend,
                choice.prompt,
                choice.params,
                self.stops,
                emit,
                self._first_token,
            )
        except GenerationError as exc:
            self.queue.put_nowait(_Event("error", choice.index, error=exc))
            return
        except Exception:  # a bug must end the stream with a 500, not leave it hanging
            log.exception("internal error in a streaming choice")
            error = GenerationError("internal_error", "internal server error")
            self.queue.put_nowait(_Event("error", choice.index, error=error))
            return
        self.results[choice.index] = result
        self.queue.put_nowait(_Event("done", choice.index, result=result))

    def _first_token(self) -> None:
        if not self.ttft_seen:
            self.ttft_seen = True
            self.state.metrics.observe_ttft(self.endpoint, time.monotonic() - self.start)

    async def next_event(self) -> _Event:
        """The next event; raises asyncio.TimeoutError past the request's deadline."""
        if self.deadline is None:
            return await self.queue.get()
        return await asyncio.wait_for(self.queue.get(), max(0.0, self.deadline - time.monotonic()))

    async def close(self, outcome: str = "aborted") -> None:
        """Stop everything and count ``outcome`` ("success": the whole stream was sent)."""
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.state.release()
        metrics = self.state.metrics
        if outcome == "success":
            results = [self.results[c.index] for c in self.choices]
            prompt_tokens, completion_tokens, _ = token_totals(self.choices, results)
            metrics.observe_success(
                self.endpoint, time.monotonic() - self.start, prompt_tokens, completion_tokens
            )
        else:
            metrics.observe_outcome(self.endpoint, outcome)

    def usage(self) -> dict[str, Any]:
        results = [self.results[c.index] for c in self.choices]
        return usage(*token_totals(self.choices, results))


async def serve_stream(
    state: ServerState,
    request: Request,
    endpoint: str,
    body: oa._SamplingFields,
    choices: list[Choice],
    fmt: ResponseFormat,
    start: float,
) -> Response:
    """Start the choices and wait for the first event, so a request the coordinator refuses
    at once (400, 429, 503) gets a real HTTP status rather than an error inside a 200 stream."""
    run = _StreamRun(state, endpoint, choices, body.stop, start)
    run.begin()
    try:
        first = await _first_event(run, request)
    except asyncio.TimeoutError:
        await run.close("timeout")
        raise timeout_error() from None
    except Disconnected:
        await run.close("aborted")
        return Response(status_code=499)
    except BaseException:
        await run.close("aborted")
        raise
    if first.kind == "error":
        error, outcome = openai_error(first.error)
        await run.close(outcome)
        raise error
    return StreamingResponse(
        _sse(run, first, fmt, body.include_usage()),
        media_type="text/event-stream",
        headers=_SSE_HEADERS,
        background=BackgroundTask(run.close),
    )


async def _first_event(run: _StreamRun, request: Request) -> _Event:
    """The stream's first event, or Disconnected if the client leaves before it comes."""
    first = asyncio.ensure_future(run.next_event())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if first.done():
            return first.result()
        raise Disconnected
    finally:
        first.cancel()
        watcher.cancel()
        await asyncio.gather(first, watcher, return_exceptions=True)


def _sse_data(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _sse(
    run: _StreamRun, first: _Event, fmt: ResponseFormat, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's shape: chunks, an optional usage chunk, ``[DONE]``."""
    outcome = "aborted"  # unless we get to the end: the client went away
    unfinished = len(run.choices)  # counted here: the tasks may all be done long before
    try:
        for chunk in fmt.opening_chunks([c.index for c in run.choices], include_usage):
            yield _sse_data(chunk)
        event = first
        while True:
            if event.kind == "delta":
                yield _sse_data(fmt.delta_chunk(event.index, event.text, include_usage))
            elif event.kind == "done":
                reason = event.result.finish_reason
                yield _sse_data(fmt.finish_chunk(event.index, reason, include_usage))
                unfinished -= 1
                if unfinished == 0:
                    break
            else:
                error, outcome = openai_error(event.error)
                yield _sse_data(error.body())
                yield "data: [DONE]\n\n"
                return
            try:
                event = await run.next_event()
            except asyncio.TimeoutError:
                outcome = "timeout"
                yield _sse_data(timeout_error().body())
                yield "data: [DONE]\n\n"
                return
        if include_usage:
            yield _sse_data(fmt.usage_chunk(run.usage()))
        yield "data: [DONE]\n\n"
        outcome = "success"
    finally:
        await run.close(outcome)
