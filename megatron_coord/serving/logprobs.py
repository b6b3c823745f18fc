"""Log-probabilities in OpenAI's and vLLM's shapes, from a finished choice.

- completions (OpenAI's legacy object): ``tokens``, ``token_logprobs``, ``top_logprobs`` (the
  ``logprobs`` likeliest tokens and the chosen one, as strings) and ``text_offset``; with
  ``echo`` the prompt's tokens come first, the first of them with ``null``;
- chat: ``content``, one entry per generated token with its ``top_logprobs`` alternatives;
- vLLM's ``prompt_logprobs``: per prompt position a map token id -> ``{logprob, rank,
  decoded_token}`` (the prompt's token and the likeliest ones), the first position ``null``.

Tokens read as the server's tokenizer decodes each one; without a tokenizer, ``token_id:N``.
Generated tokens are cut where a stop string cut the text.
"""

from __future__ import annotations

import functools
from typing import Any

from .generation import ChoiceResult


class TokenText:
    """How a token id reads: its tokenizer decoding (memoized), or ``token_id:N``."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.piece = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        try:
            return self.tokenizer.detokenize([token_id])
        except Exception:
            return f"token_id:{token_id}"

    def pieces(self, token_ids: list[int]) -> list[str]:
        piece = self.piece
        return [piece(t) for t in token_ids]


def kept_tokens(pieces: list[str], text: str, cut_by_text: bool) -> int:
    """How many generated tokens the text holds (a stop string may have cut it)."""
    if not cut_by_text:
        return len(pieces)
    kept, length = 0, 0
    while kept < len(pieces) and length < len(text):
        length += len(pieces[kept])
        kept += 1
    return kept


def _top_entry(
    texts: TokenText, token: int, log_prob: float, top: dict[int, float] | None, n: int
) -> dict[str, float]:
    """The ``n`` likeliest tokens as text, and the chosen one."""
    entry: dict[str, float] = {}
    if top is not None:
        for token_id, value in list(top.items())[:n]:
            entry.setdefault(texts.piece(token_id), value)
    entry.setdefault(texts.piece(token), log_prob)
    return entry


def completion_logprobs(
    texts: TokenText,
    result: ChoiceResult,
    top_n: int,
    kept: int,
    echo: bool,
) -> dict[str, Any] | None:
    """The legacy ``logprobs`` object of one choice (None if the engine sent no log-probs)."""
    if result.log_probs is None or len(result.log_probs) < kept:
        return None
    tokens: list[int] = []
    values: list[float | None] = []
    tops: list[dict[int, float] | None] = []
    if echo:
        prompt = result.prompt_ids
        tokens += prompt
        given = result.prompt_log_probs
        if given is not None and len(given) == len(prompt) - 1:
            values += [None, *given]
        else:
            values += [None] * len(prompt)
        tops += [None, *_padded(result.prompt_top_n, len(prompt) - 1)]
    tokens += result.token_ids[:kept]
    values += result.log_probs[:kept]
    tops += _padded(result.top_n, len(result.token_ids))[:kept]
    pieces = texts.pieces(tokens)
    top_logprobs = [
        None if value is None else _top_entry(texts, token, value, top, top_n)
        for token, value, top in zip(tokens, values, tops, strict=True)
    ]
    offsets, offset = [], 0
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": values,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def _padded(lists: list | None, length: int) -> list:
    """Per-position top-N dicts, None where the engine sent none."""
    if lists is None or len(lists) < length:
        return [None] * length
    return lists[:length]


def _chat_alternative(texts: TokenText, token: int, log_prob: float) -> dict[str, Any]:
    piece = texts.piece(token)
    return {"token": piece, "logprob": log_prob, "bytes": list(piece.encode())}


def chat_logprobs(
    texts: TokenText, result: ChoiceResult, top_n: int, kept: int
) -> dict[str, Any] | None:
    """The chat ``logprobs`` object of one choice (None if the engine sent no log-probs)."""
    if result.log_probs is None or len(result.log_probs) < kept:
        return None
    tops = _padded(result.top_n, len(result.token_ids))
    content = []
    for token, value, top in zip(result.token_ids[:kept], result.log_probs, tops, strict=False):
        entry = _chat_alternative(texts, token, value)
        alternatives = list(top.items())[:top_n] if top is not None and top_n else []
        entry["top_logprobs"] = [_chat_alternative(texts, t, lp) for t, lp in alternatives]
        content.append(entry)
    return {"content": content}


def prompt_logprobs(
    texts: TokenText, result: ChoiceResult, top_n: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` of one prompt (``null`` where the engine sent none)."""
    prompt = result.prompt_ids
    given = result.prompt_log_probs
    if given is None or len(given) != len(prompt) - 1:
        return [None] * len(prompt)
    tops = _padded(result.prompt_top_n, len(given))
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for token, value, top in zip(prompt[1:], given, tops, strict=True):
        ranked = list(top.items()) if top is not None else []
        ranks = {t: rank for rank, (t, _) in enumerate(ranked, start=1)}
        entry = {str(token): _vllm_logprob(texts, token, value, ranks.get(token))}
        for t, lp in ranked[:top_n]:
            entry.setdefault(str(t), _vllm_logprob(texts, t, lp, ranks[t]))
        out.append(entry)
    return out


def _vllm_logprob(texts: TokenText, token: int, value: float, rank: int | None) -> dict[str, Any]:
    return {"logprob": value, "rank": rank, "decoded_token": texts.piece(token)}
