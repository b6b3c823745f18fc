"""The fake engine's model: its stopping rules, log-probabilities and prefix cache.

Deterministic functions of the prompt and the sampling params, so a test computes what the
fake engine (fake_engine.py) answers: the HTTP front end's mapping of prompt log-probs, top-N
alternatives, stop tokens and cached tokens is testable without a real model.
"""

from __future__ import annotations

from typing import Any

FAKE_VOCAB = 256  # the fake model's vocabulary (ByteTokenizer's)
FAKE_BLOCK = 4  # the fake prefix cache's block size, in tokens


def echo(prompt_tokens: list[int], count: int) -> list[int]:
    """``count`` tokens repeating the prompt (the fake engine's generation)."""
    n = len(prompt_tokens)
    return [prompt_tokens[i % n] for i in range(count)] if n else []


def fake_log_prob(token: int, position: int) -> float:
    """The fake model's log-probability of ``token``, its likeliest, at ``position`` (counted
    over prompt and generated tokens, from 0)."""
    return -((token + position) % 8 + 1) / 4


def fake_top_n(token: int, position: int, n: int) -> dict[int, float]:
    """The fake model's ``n`` likeliest tokens at ``position`` where it puts ``token`` first,
    in descending order: ``token``, then ``token + k`` (mod FAKE_VOCAB) 2k lower."""
    top = fake_log_prob(token, position)
    return {(token + k) % FAKE_VOCAB: top - 2 * k for k in range(n)}


def generate_until_stop(prompt: list[int], sampling: dict[str, Any]) -> tuple[list[int], str]:
    """The echo and why it ended: at ``termination_id`` (unless ``ignore_eos``) or a
    ``stop_token_ids`` token, included ("stop"), else at the budget ("length"). Before
    ``min_tokens`` tokens those ids are masked: the echo takes the next id instead."""
    count = sampling.get("num_tokens_to_generate", 30)
    termination = sampling.get("termination_id")
    masked = set(sampling.get("stop_token_ids") or ())
    ends = set(masked)
    if termination is not None:
        masked.add(termination)
        if not sampling.get("ignore_eos"):
            ends.add(termination)
    if not masked or not prompt:
        return echo(prompt, count), "length"
    min_tokens = sampling.get("min_tokens", 0)
    out: list[int] = []
    for i in range(count):
        token = prompt[i % len(prompt)]
        if i < min_tokens:
            for _ in range(FAKE_VOCAB):  # every id masked is impossible: bounded anyway
                if token not in masked:
                    break
                token = (token + 1) % FAKE_VOCAB
        out.append(token)
        if i >= min_tokens and token in ends:
            return out, "stop"
    return out, "length"


def log_prob_fields(
    prompt: list[int], generated: list[int], sampling: dict[str, Any]
) -> dict[str, Any]:
    """The log-probability fields of a record, as the sampling params ask for them."""
    fields: dict[str, Any] = {}
    top_n = sampling.get("top_n_logprobs", 0)
    start = len(prompt)
    if sampling.get("return_log_probs"):
        fields["generated_log_probs"] = [
            fake_log_prob(t, start + j) for j, t in enumerate(generated)
        ]
        if not sampling.get("skip_prompt_log_probs"):
            fields["prompt_log_probs"] = [
                fake_log_prob(prompt[i], i) for i in range(1, len(prompt))
            ]
    if top_n > 0:
        fields["generated_top_n_logprobs"] = [
            fake_top_n(t, start + j, top_n) for j, t in enumerate(generated)
        ]
        if sampling.get("return_prompt_top_n_logprobs"):
            fields["prompt_top_n_logprobs"] = [
                fake_top_n(prompt[i], i, top_n) for i in range(1, len(prompt))
            ]
    return fields


class FakePrefixCache:
    """The prompts this engine saw (bounded: forgotten when full). A prompt seen before has
    every full FAKE_BLOCK-token block short of its last token cached; a new one has none. One
    hash of the prompt per request, so the fake stays fast under benchmark load."""

    LIMIT = 65536

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def lookup_and_add(self, prompt: list[int], use: bool) -> int:
        """Prompt tokens found cached (0 unless ``use``: prompt log-probs bypass the cache, as
        in the real engine); remembers the prompt."""
        if len(self.seen) > self.LIMIT:
            self.seen.clear()
        key = hash(tuple(prompt))
        hit = use and key in self.seen
        self.seen.add(key)
        return (len(prompt) - 1) // FAKE_BLOCK * FAKE_BLOCK if hit else 0
