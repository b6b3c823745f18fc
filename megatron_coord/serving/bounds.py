"""What a served model bounds in a request: its name, vocabulary, context and new-token limit.

The HTTP front end checks every integer at its edge (a 400 naming the field, never a 500 from
deeper down) and its OpenAPI document states the same bounds, so both come from here. None
means unknown (no check beyond what fits the wire: a signed 64-bit integer).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_INT64 = 2**63 - 1


@dataclass(frozen=True)
class ServedLimits:
    """The bounds of one served model (None: unknown, or any model name)."""

    model_name: str | None = None
    vocab_size: int | None = None
    max_model_len: int | None = None  # the context: prompt + max_tokens must fit
    max_tokens_limit: int | None = None  # the server's own cap on max_tokens

    @property
    def token_id_max(self) -> int:
        """The largest token id a request may carry."""
        return self.vocab_size - 1 if self.vocab_size else MAX_INT64

    @property
    def max_new_tokens(self) -> int:
        """The largest max_tokens that can ever be served: a prompt has at least one token."""
        bounds = [MAX_INT64]
        if self.max_tokens_limit is not None:
            bounds.append(self.max_tokens_limit)
        if self.max_model_len is not None:
            bounds.append(max(0, self.max_model_len - 1))
        return min(bounds)

    @property
    def max_prompt_tokens(self) -> int | None:
        return self.max_model_len


def _digits(low: int, high: int) -> str:
    return str(low) if low == high else f"[{low}-{high}]"


def decimal_below(bound: int) -> str:
    """A regular expression (anchored) matching the decimals 0 .. bound - 1, without leading
    zeros: how the OpenAPI document bounds logit_bias's token-id keys, which are strings."""
    if bound < 1:
        raise ValueError("bound must be >= 1")
    top = str(bound - 1)
    width = len(top)
    alternatives = ["0"]
    if width >= 2:
        alternatives.append("[1-9]" if width == 2 else f"[1-9][0-9]{{0,{width - 2}}}")
    for i, digit in enumerate(int(d) for d in top):
        low = 1 if i == 0 and width > 1 else 0
        if digit > low:
            rest = width - i - 1
            tail = f"[0-9]{{{rest}}}" if rest > 1 else ("[0-9]" if rest == 1 else "")
            alternatives.append(top[:i] + _digits(low, digit - 1) + tail)
    alternatives.append(top)
    unique = list(dict.fromkeys(alternatives))
    return "^(" + "|".join(unique) + ")$"
