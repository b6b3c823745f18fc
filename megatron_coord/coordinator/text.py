"""Text in and out of the coordinator: prompts tokenized in one batch per wake-up, replies
detokenized in one batch per engine reply, one bad item failing only its own request."""

from __future__ import annotations

from typing import Any

from ..protocol import ErrorCode, ProtocolError
from ..tokenizer import as_megatron_tokenizer, tokenize_batch
from .wire import tokens_of


def _batch_detokenizer(tokenizer: Any):
    """One call that detokenizes many token lists (a single Rust call for HF tokenizers)."""
    batch = getattr(tokenizer, "detokenize_batch", None)
    if batch is not None:
        return batch
    detokenize = tokenizer.detokenize
    return lambda token_lists: [detokenize(tokens) for tokens in token_lists]


class TextCodec:
    """The coordinator's tokenizer (Megatron's interface, or Hugging Face's adapted), batched."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = as_megatron_tokenizer(tokenizer)
        self.detokenize = self.tokenizer.detokenize
        self._detokenize_batch = _batch_detokenizer(self.tokenizer)

    def tokenize(self, texts: list[str]) -> list[list[int] | str]:
        """Token ids of each text, or why it cannot be tokenized (one call; per text on failure)."""
        try:
            token_lists = tokenize_batch(self.tokenizer, texts)
        except Exception:
            token_lists = None
        out: list[list[int] | str] = []
        for index, text in enumerate(texts):
            try:
                tokens = (
                    token_lists[index] if token_lists is not None else self.tokenizer.tokenize(text)
                )
                if not tokens:
                    raise ValueError("the prompt tokenized to nothing")
                out.append(list(tokens))
            except Exception as exc:
                out.append(f"cannot tokenize the prompt: {exc}")
        return out

    def detokenize_records(
        self, records: list[dict], prompt_text: dict[int, str], strict: bool = True
    ) -> dict[int, str]:
        """Fill generated_text and missing prompts of every request of ``records`` in one call
        (a text prompt is taken from ``prompt_text``, by request id, rather than decoded).

        Returns {record index: reason} for records that could not be detokenized (with
        ``strict`` the first such reason raises ProtocolError instead).
        """
        jobs: list[tuple[int, dict, str]] = []
        token_lists: list[list[int]] = []
        failed: dict[int, str] = {}
        for index, record in enumerate(records):
            try:
                for request in record["requests"]:
                    generated = tokens_of(request["generated_tokens"])
                    if request.get("prompt") is None:
                        text = prompt_text.get(request.get("request_id"))
                        if text is not None:
                            request["prompt"] = text
                        elif "prompt_tokens" in request and request["prompt_tokens"] is None:
                            pass  # 0.19's engines send None unless asked: nothing to decode
                        else:
                            prompt_tokens = tokens_of(request["prompt_tokens"])  # may raise:
                            jobs.append((index, request, "prompt"))  # then append nothing
                            token_lists.append(prompt_tokens)
                    jobs.append((index, request, "generated_text"))
                    token_lists.append(generated)
            except (KeyError, TypeError, ProtocolError) as exc:
                failed[index] = f"malformed engine reply: {exc!r}"
        texts = self._run_detokenizer(token_lists)
        for (index, request, field), text in zip(jobs, texts, strict=True):
            if isinstance(text, Exception):
                failed.setdefault(index, f"cannot detokenize: {text}")
            else:
                request[field] = text
        if strict and failed:
            raise ProtocolError(ErrorCode.MALFORMED, next(iter(failed.values())))
        return failed

    def _run_detokenizer(self, token_lists: list[list[int]]) -> list[Any]:
        """Batch-detokenize; on failure retry one by one so one bad list fails only itself."""
        if not token_lists:
            return []
        try:
            return list(self._detokenize_batch(token_lists))
        except Exception:
            results: list[Any] = []
            for tokens in token_lists:
                try:
                    results.append(self.tokenizer.detokenize(tokens))
                except Exception as exc:
                    results.append(exc)
            return results
