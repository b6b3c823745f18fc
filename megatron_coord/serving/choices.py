"""From a validated request to engine requests, and from their results to OpenAI's choices.

Each prompt of a request becomes ``candidates`` engine requests (``n``, or ``best_of`` when
larger); a prompt whose tokens plus ``max_tokens`` pass the model's context is refused with a
400 naming both numbers (as OpenAI and vLLM do), or -- where the client gave no max_tokens --
gets the room that is left. Results come back as ``ChoiceOut``: the ``n`` best candidates of
each prompt (by cumulative log-probability) with echo and log-probs as asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sampling_params import SamplingParams
from . import logprobs as lp
from . import openai_protocol as oa
from .generation import ChoiceResult
from .openai_protocol import OpenAIError
from .responses import ChoiceOut


@dataclass
class Choice:
    """One engine request of an HTTP request: a prompt and a candidate number."""

    index: int  # prompt * candidates + candidate
    prompt: str | list[int]
    params: SamplingParams
    counts_prompt: bool  # the first candidate of its prompt: its prompt tokens go into usage
    drop_generated: bool = False  # echo with max_tokens 0: the engine's one token is dropped


def token_totals(choices: list[Choice], results: list[ChoiceResult]) -> tuple[int, int, int]:
    """Prompt tokens (once per prompt), completion tokens (every candidate, as OpenAI bills
    best_of) and cached prompt tokens of an answer."""
    counted = [r for c, r in zip(choices, results, strict=True) if c.counts_prompt]
    return (
        sum(r.prompt_tokens for r in counted),
        sum(r.completion_tokens for r in results),
        sum(r.cached_tokens for r in counted),
    )


def _explicit_max_tokens(body: oa._SamplingFields) -> bool:
    return any(
        getattr(body, name, None) is not None and name in body.model_fields_set
        for name in ("max_tokens", "max_completion_tokens")
    )


def _check_text(text: str, param: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        message = f"{param} is not valid Unicode text (a lone surrogate)"
        raise OpenAIError(400, message, param=param) from None


def _fit_context(
    state: Any, prompt: str | list[int], max_new: int, explicit: bool, param: str
) -> int:
    """The new-token budget of ``prompt`` within the context (400 where it cannot fit)."""
    context = state.limits.max_model_len
    if context is None:
        return max_new
    if isinstance(prompt, list):
        length = len(prompt)
    else:
        # Cheap bound first: a token holds at least one UTF-8 byte (one more for a tokenizer's
        # leading piece), so most prompts need no tokenizing here.
        if len(prompt.encode()) + 1 + max_new <= context or state.tokenizer is None:
            return max_new
        length = len(state.tokenizer.tokenize(prompt))
    if length + max_new <= context:
        return max_new
    if not explicit and length < context:
        return context - length
    raise OpenAIError(
        400,
        f"this model's context length is {context} tokens, but the request needs "
        f"{length + max_new}: {length} in the {param} and {max_new} in max_tokens; reduce "
        "the prompt or max_tokens",
        param="max_tokens" if length < context else param,
        code="context_length_exceeded",
    )


def build_choices(
    state: Any,
    body: oa._SamplingFields,
    prompts: list[str | list[int]],
    max_new: int,
    param: str = "prompt",
) -> list[Choice]:
    """The engine requests of ``body``: ``candidates`` per prompt."""
    explicit = _explicit_max_tokens(body)
    drop = max_new == 0 and body.prompt_top_n() is not None  # the engine must see the prompt
    count = body.candidates()
    choices = []
    for p, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            _check_text(prompt, param)
        budget = _fit_context(state, prompt, 1 if drop else max_new, explicit, param)
        for j in range(count):
            params = oa.to_sampling_params(
                body, budget, j, state.termination_id, state.limits.vocab_size
            )
            choices.append(Choice(p * count + j, prompt, params, j == 0, drop))
    return choices


def _cumulative(result: ChoiceResult) -> float:
    return sum(result.log_probs) if result.log_probs else 0.0


def answer_choices(
    state: Any,
    body: oa._SamplingFields,
    choices: list[Choice],
    results: list[ChoiceResult],
) -> list[ChoiceOut]:
    """The answer's choices: per prompt its ``n`` best candidates, numbered prompt * n + i
    (``results`` lose the generations their choices drop: call this before token_totals)."""
    for choice, result in zip(choices, results, strict=True):
        if choice.drop_generated:
            result.drop_generated()
    count, n = body.candidates(), body.choices
    out = []
    for start in range(0, len(results), count):
        group = results[start : start + count]
        if count > n:
            group = sorted(group, key=_cumulative, reverse=True)[:n]
        base = start // count * n
        out += [choice_out(state, body, base + i, r) for i, r in enumerate(group)]
    return out


def choice_out(state: Any, body: oa._SamplingFields, index: int, result: ChoiceResult) -> ChoiceOut:
    """One choice with echo, log-probs and prompt log-probs as ``body`` asks."""
    texts: lp.TokenText = state.token_text
    text = result.text
    logprobs = None
    if body.wants_logprobs():
        pieces = texts.pieces(result.token_ids)
        kept = lp.kept_tokens(pieces, text, state.tokenizer is not None)
        if isinstance(body, oa.CompletionRequest):
            logprobs = lp.completion_logprobs(
                texts, result, body.generated_top_n(), kept, bool(body.echo)
            )
        else:
            logprobs = lp.chat_logprobs(texts, result, body.generated_top_n(), kept)
    if isinstance(body, oa.CompletionRequest) and body.echo:
        prompt_text = result.prompt_text
        if prompt_text is None:
            prompt_text = "".join(texts.pieces(result.prompt_ids))
        text = prompt_text + text
    prompt_n = body.prompt_logprobs
    prompt = lp.prompt_logprobs(texts, result, prompt_n) if prompt_n is not None else None
    return ChoiceOut(index, text, result.finish_reason, logprobs, prompt)
