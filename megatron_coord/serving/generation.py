"""One generation (one OpenAI "choice") through the coordinator, as the HTTP server needs it.

This is the seam between the HTTP front end and ``InferenceClient``: it turns the client's
futures, partial replies and ``RequestError``s into plain events (``Delta`` text, a final
``ChoiceResult``) and ``GenerationError``s, applies OpenAI ``stop`` strings, and aborts the engine
request whenever the caller stops listening (cancellation, a stop string, a disconnect), so no
replica keeps generating for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..client import InferenceClient, RequestError
from ..sampling_params import SamplingParams
from .stop_strings import StopMatcher


class GenerationError(Exception):
    """A request the coordinator or engine refused or failed; ``code`` is a protocol ErrorCode
    value (``overloaded``, ``no_engine``, ``invalid_request``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Delta:
    """New text of a streaming generation: ``tokens`` new tokens of engine request
    ``request_id`` (the client's id, for aborting)."""

    text: str
    tokens: int
    request_id: int | None = None


@dataclass
class ChoiceResult:
    """A finished generation: its text (after stop strings), token counts, the generated token
    ids (end-of-text token dropped) and -- when asked for -- their log-probabilities and top-N
    alternatives, the prompt's (ids, text, log-probs of positions 1.., top-N) and how many
    prompt tokens the prefix cache served."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] | None = None
    top_n: list[dict[int, float]] | None = None
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str | None = None
    prompt_log_probs: list[float] | None = None
    prompt_top_n: list[dict[int, float]] | None = None
    cached_tokens: int = 0

    def drop_generated(self) -> None:
        """Forget the generation (echo with max_tokens 0 asked the engine for one token, to
        have the prompt's log-probs computed)."""
        self.text, self.completion_tokens, self.finish_reason = "", 0, "length"
        self.token_ids = []
        self.log_probs = [] if self.log_probs is not None else None
        self.top_n = [] if self.top_n is not None else None

    def cut_last_token(self) -> None:
        """Drop the last generated token from the ids and their log-probs (not the text)."""
        self.token_ids = self.token_ids[:-1]
        if self.log_probs is not None:
            self.log_probs = self.log_probs[:-1]
        if self.top_n is not None:
            self.top_n = self.top_n[:-1]


class CoordinatorBackend:
    """Runs generations through one ``InferenceClient`` connected to the coordinator.

    ``eod_text``, when known (the tokenizer's end-of-text token as text), is cut from the end of
    generated text: OpenAI's answers never contain the end-of-text marker.
    """

    def __init__(
        self,
        address: str,
        eod_text: str | None = None,
        connect_timeout_s: float = 30.0,
        wait_for_coordinator: bool = True,
    ) -> None:
        self.address = address
        self.eod_text = eod_text or None
        self.connect_timeout_s = connect_timeout_s
        self.wait_for_coordinator = wait_for_coordinator
        self.client: InferenceClient | None = None

    async def start(self) -> None:
        """Connect (the coordinator answers CONNECT once every engine has registered); with
        ``wait_for_coordinator`` False, in the background (the server is live, not ready)."""
        client = InferenceClient(self.address, connect_timeout=self.connect_timeout_s)
        await client.start(wait=self.wait_for_coordinator)
        self.client = client

    @property
    def connected(self) -> bool:
        """Whether a coordinator has acknowledged us (False while it is away)."""
        return self.client is not None and self.client.connected.is_set()

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()
            self.client = None

    def _client(self) -> InferenceClient:
        if self.client is None:
            raise GenerationError("shutting_down", "the server is not connected to a coordinator")
        if not self.client.connected.is_set():
            raise GenerationError(
                "no_coordinator",
                f"the coordinator at {self.address} is unreachable (reconnecting); retry later",
            )
        return self.client

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> ChoiceResult:
        """Run one request to completion (no partial results)."""
        client = self._client()
        try:
            future = client.add_request(prompt, params)
        except ValueError as exc:  # what msgpack cannot carry (the HTTP edge checks first)
            raise GenerationError("invalid_request", str(exc)) from None
        future.add_done_callback(_retrieve)
        try:
            record = await asyncio.shield(future)
        except asyncio.CancelledError:
            _abort(client, future)
            raise
        except RequestError as exc:
            raise GenerationError(exc.code, exc.message) from None
        except ConnectionError as exc:  # the coordinator was lost and did not come back
            raise GenerationError("no_coordinator", str(exc)) from None
        return self._result(record, params)

    async def stream(
        self, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[Delta | ChoiceResult]:
        """Yield ``Delta``s as tokens arrive, then the ``ChoiceResult``. Closing the iterator
        before the result aborts the request."""
        client = self._client()
        params.streaming_interval = max(params.streaming_interval, 1)
        parts = client.add_request_streaming(prompt, params)
        # The request is submitted synchronously on the first __anext__ below, with no await in
        # between, so it takes the client's next id: known now, so even a request cancelled
        # before its first token can be aborted.
        request_id = client.next_request_id
        finished = False
        sent_text = ""
        try:
            async for item in parts:
                if _is_final(item):
                    finished = True
                    result = self._result(item, params)
                    if result.text.startswith(sent_text) and len(result.text) > len(sent_text):
                        # No request id: the request is over, there is nothing to abort.
                        yield Delta(result.text[len(sent_text) :], 0, None)
                    yield result
                    return
                text, tokens = _partial(item)
                sent_text += text
                yield Delta(text, tokens, request_id)
        except RequestError as exc:
            finished = True
            raise GenerationError(exc.code, exc.message) from None
        except ValueError as exc:  # not submitted: msgpack cannot carry it
            finished = True
            raise GenerationError("invalid_request", str(exc)) from None
        except ConnectionError as exc:  # lost mid-stream: nothing left to abort
            finished = True
            raise GenerationError("no_coordinator", str(exc)) from None
        finally:
            if not finished:
                self.abort(request_id)
            await parts.aclose()

    def abort(self, request_id: int) -> None:
        """Ask the engine to stop generating ``request_id`` (best effort)."""
        if self.client is not None:
            _abort(self.client, request_id)

    def _result(self, record: Any, params: SamplingParams) -> ChoiceResult:
        result = record_view(record)
        if self.eod_text and result.text.endswith(self.eod_text):
            result.text = result.text[: -len(self.eod_text)]
            result.cut_last_token()
        if result.finish_reason not in ("stop", "length"):
            budget = params.num_tokens_to_generate
            result.finish_reason = "length" if result.completion_tokens >= budget else "stop"
        return result


async def run_choice(
    backend: CoordinatorBackend,
    prompt: str | list[int],
    params: SamplingParams,
    stops: list[str],
    emit: Callable[[str], None] | None = None,
    on_first_token: Callable[[], None] | None = None,
) -> ChoiceResult:
    """One choice: streamed (``emit`` gets each piece of text) or not, with stop strings.

    Without streaming and stop strings this is one plain request. Otherwise the generation
    streams and its text passes through the stop matcher; a matched stop string aborts the
    engine request at once (instead of generating up to ``max_tokens`` for nothing), and the
    aborted request's final record still supplies the token counts for ``usage``.
    """
    if emit is None and not stops:
        return await backend.generate(prompt, params)
    matcher = StopMatcher(stops, params.include_stop_str_in_output)
    pieces: list[str] = []
    waiting_for_first = on_first_token is not None
    tokens = 0
    stream = backend.stream(prompt, params)
    try:
        async for event in stream:
            if isinstance(event, ChoiceResult):
                if waiting_for_first and event.completion_tokens:
                    on_first_token()
                _send(matcher.flush(), pieces, emit)
                event.text = "".join(pieces)
                event.finish_reason = "stop" if matcher.stopped else event.finish_reason
                return event
            if waiting_for_first and event.tokens:
                on_first_token()
                waiting_for_first = False
            tokens += event.tokens
            if matcher.stopped:
                continue  # aborted: waiting for the final record (usage)
            _send(matcher.feed(event.text), pieces, emit)
            if matcher.stopped and event.request_id is not None:
                backend.abort(event.request_id)
    except GenerationError:
        if not matcher.stopped:
            raise
    finally:
        await stream.aclose()
    # Stopped, and the abort raced the end of the request: count what we saw.
    prompt_ids = prompt if isinstance(prompt, list) else []
    return ChoiceResult("".join(pieces), len(prompt_ids), tokens, "stop", prompt_ids=prompt_ids)


def _retrieve(future: asyncio.Future) -> None:
    """Mark a shielded future's exception as seen (its awaiter may have been cancelled)."""
    if not future.cancelled():
        future.exception()


def _send(text: str, pieces: list[str], emit: Callable[[str], None] | None) -> None:
    if text:
        pieces.append(text)
        if emit is not None:
            emit(text)


def _abort(client: InferenceClient, handle: Any) -> None:
    with contextlib.suppress(Exception):  # the request may be gone: aborting is best effort
        client.abort_request(handle)


def record_view(record: Any) -> ChoiceResult:
    """A finished record as a ChoiceResult (its finish reason as the engine gave it).

    Records are Megatron's serialized ``DynamicInferenceRequestRecord``: ``{"requests": [...]}``
    where a request evicted and resumed appears as several entries; the generation is their
    concatenation, the prompt's fields are the first entry's. ``prompt_tokens`` may come as
    Megatron's ``["tensor", ids]``; top-N dicts may have their token ids as strings.
    """
    requests = _field(record, "requests")
    if not isinstance(requests, list) or not requests:
        requests = [record]  # a bare request dict
    first, last = requests[0], requests[-1]
    prompt = _field(first, "prompt_tokens") or []
    if len(prompt) == 2 and prompt[0] == "tensor" and isinstance(prompt[1], list):
        prompt = prompt[1]
    token_ids = [t for r in requests for t in _field(r, "generated_tokens") or []]
    prompt_text = _field(first, "prompt")
    return ChoiceResult(
        text="".join(_field(r, "generated_text") or "" for r in requests),
        prompt_tokens=len(prompt),
        completion_tokens=len(token_ids),
        finish_reason=_field(last, "finish_reason"),
        token_ids=token_ids,
        log_probs=_joined(requests, "generated_log_probs"),
        top_n=_top_n_lists(_joined(requests, "generated_top_n_logprobs")),
        prompt_ids=list(prompt),
        prompt_text=prompt_text if isinstance(prompt_text, str) else None,
        prompt_log_probs=_list_or_none(_field(first, "prompt_log_probs")),
        prompt_top_n=_top_n_lists(_list_or_none(_field(first, "prompt_top_n_logprobs"))),
        cached_tokens=_field(first, "cached_tokens") or 0,
    )


def _list_or_none(value: Any) -> list | None:
    return value if isinstance(value, list) else None


def _joined(requests: list[Any], name: str) -> list | None:
    """The concatenation of a per-token list over a record's entries (None if one lacks it)."""
    parts = [_field(r, name) for r in requests]
    if not all(isinstance(part, list) for part in parts):
        return None
    return [item for part in parts for item in part]


def _top_n_lists(lists: list | None) -> list[dict[int, float]] | None:
    """Top-N dicts keyed by int token ids, in descending order of log-prob."""
    if lists is None:
        return None
    out = []
    for entry in lists:
        if not isinstance(entry, dict):
            return None
        pairs = [(int(k), v) for k, v in entry.items()]
        pairs.sort(key=lambda kv: -kv[1])
        out.append(dict(pairs))
    return out


def _field(record: Any, name: str) -> Any:
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


def _is_final(item: Any) -> bool:
    """Partial results are ``{"request_id", "tokens", "text"}``; final records have requests."""
    return _field(item, "requests") is not None or _field(item, "generated_tokens") is not None


def _partial(item: Any) -> tuple[str, int]:
    return _field(item, "text") or "", len(_field(item, "tokens") or [])
