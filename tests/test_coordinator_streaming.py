"""Incremental detokenization of streamed tokens never splits a multi-byte character."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_coord.coordinator.requests import Stream
from megatron_coord.testing.fake_engine import ByteTokenizer


@settings(max_examples=200, deadline=None)
# A genuine trailing U+FFFD is held back like an incomplete character (the final record still
# carries the whole text), so it is left out of the alphabet here; so are lone surrogates, which
# no UTF-8 text (hence no prompt) can hold.
@given(
    text=st.text(
        st.characters(codec="utf-8", exclude_characters="\ufffd"), min_size=1, max_size=40
    ),
    cuts=st.lists(st.integers(1, 5), max_size=40),
)
def test_byte_tokens_in_any_chunking_rebuild_the_text(text, cuts):
    tokenizer = ByteTokenizer()
    tokens = tokenizer.tokenize(text)
    stream = Stream()
    pieces, start = [], 0
    for size in [*cuts, len(tokens)]:
        chunk = tokens[start : start + size]
        start += size
        if chunk:
            piece = stream.push(tokenizer.detokenize, chunk)
            assert "\ufffd" not in piece
            pieces.append(piece)
        if start >= len(tokens):
            break
    assert "".join(pieces) == text


def test_gpt2_tokens_streamed_one_by_one():
    from megatron_coord.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    text = "Grüße aus Köln — 東京 🚀 and plain ASCII."
    stream = Stream()
    pieces = [stream.push(tokenizer.detokenize, [t]) for t in tokenizer.tokenize(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some multi-byte characters span tokens and were held back
