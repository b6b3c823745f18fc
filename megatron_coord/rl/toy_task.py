"""A verifiable toy task for the embedded default model: answer in numbers.

The reward of a completion is the fraction of its generated tokens that are numerals: tokens
whose text is ASCII digits, with or without a leading space (" 42", "1999", "7"). It is read
off the tokens alone, so it is exact, cheap and the same on every rank.

Why this task: the default model has random weights, so its next-token distribution is close
to uniform over the 50257 GPT-2 tokens, of which 1692 are numerals; the untrained model scores
about 0.034. Any task the model never solves by chance teaches GRPO nothing (every group's
rewards are equal, so every advantage is 0); here almost every group of 8 rollouts of 16
tokens holds a numeral somewhere, so the signal is there from the first step, while a
reward of 0.8 needs the policy to put four fifths of its mass on numerals.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch

_NUMERAL = re.compile(r" ?[0-9]+")

PROMPTS = (
    "Count from one:",
    "My phone number is",
    "The year was",
    "Pick a number:",
    "The answer is",
    "Temperature today:",
    "Room",
    "Page",
    "Score:",
    "It costs",
    "Call me at",
    "Add these up:",
    "The code is",
    "Ticket",
    "Lottery numbers:",
    "He was born in",
)


class NumeralsTask:
    """Prompts, and the reward of a completion: the fraction of numeral tokens in it."""

    def __init__(self, tokenizer: Any, vocab_size: int, prompts: Sequence[str] = PROMPTS) -> None:
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.prompt_tokens = [tokenizer.tokenize(p) for p in self.prompts]
        ids = [[i] for i in range(vocab_size)]
        batch = getattr(tokenizer, "detokenize_batch", None)
        texts = batch(ids) if batch else [tokenizer.detokenize(i) for i in ids]
        self.is_numeral = torch.tensor([_NUMERAL.fullmatch(t) is not None for t in texts])

    @property
    def numeral_ids(self) -> list[int]:
        return self.is_numeral.nonzero()[:, 0].tolist()

    def reward(self, generated_tokens: Sequence[int]) -> float:
        """The fraction of ``generated_tokens`` that are numerals, in [0, 1] (0 if none)."""
        if not generated_tokens:
            return 0.0
        return float(self.is_numeral[torch.tensor(list(generated_tokens))].float().mean())

    def sample_prompts(self, count: int, rng: random.Random) -> list[int]:
        """Indices of ``count`` distinct prompts (with repeats once they run out)."""
        order: list[int] = []
        while len(order) < count:
            order += rng.sample(range(len(self.prompts)), len(self.prompts))
        return order[:count]
