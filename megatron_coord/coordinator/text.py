"""Text in and out of the coordinator: prompts tokenized in one batch per wake-up, replies
detokenized in one batch per engine reply, one bad item failing only its own request."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from ..protocol import ErrorCode, ProtocolError
from ..tokenizer import as_megatron_tokenizer, tokenize_batch
from .wire import tokens_of


def _takes_skip_flag(method: Any) -> bool:
    """Whether a detokenize method accepts ``skip_special_tokens`` (our HF adapter does;
    Megatron's tokenizers need not)."""
    try:
        return "skip_special_tokens" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _batch_detokenizer(tokenizer: Any, skip_special_tokens: bool):
    """One call that detokenizes many token lists (a single Rust call for HF tokenizers)."""
    batch = getattr(tokenizer, "detokenize_batch", None)
    if batch is not None:
        if _takes_skip_flag(batch):
            return functools.partial(batch, skip_special_tokens=skip_special_tokens)
        return batch
    detokenize = _detokenizer(tokenizer, skip_special_tokens)
    return lambda token_lists: [detokenize(tokens) for tokens in token_lists]


def _detokenizer(tokenizer: Any, skip_special_tokens: bool):
    """``detokenize`` honouring the flag where the tokenizer can (else as it is)."""
    detokenize = tokenizer.detokenize
    if _takes_skip_flag(detokenize):
        return functools.partial(detokenize, skip_special_tokens=skip_special_tokens)
    return detokenize


class TextCodec:
    """The coordinator's tokenizer (Megatron's interface, or Hugging Face's adapted), batched.

    Generated text honours each request's ``skip_special_tokens`` (SamplingParams, default
    True): ``detokenize`` skips them, ``detokenize_keeping_special`` keeps them (a record or
    a streaming chunk that says ``"skip_special_tokens": False``). Prompts and the token
    strings of Megatron's top-N dicts (``token_texts``) keep them.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = as_megatron_tokenizer(tokenizer)
        self.detokenize = _detokenizer(self.tokenizer, skip_special_tokens=True)
        self.detokenize_keeping_special = _detokenizer(self.tokenizer, skip_special_tokens=False)
        self._detokenize_batch = {
            skip: _batch_detokenizer(self.tokenizer, skip) for skip in (True, False)
        }

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
        # Two batches: texts that skip special tokens (generated text, by default) and texts
        # that keep them (prompts, and generated text that asked to keep them).
        jobs: dict[bool, list[tuple[int, dict, str]]] = {True: [], False: []}
        token_lists: dict[bool, list[list[int]]] = {True: [], False: []}
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
                            jobs[False].append((index, request, "prompt"))  # then nothing
                            token_lists[False].append(prompt_tokens)
                    skip = request.get("skip_special_tokens") is not False
                    jobs[skip].append((index, request, "generated_text"))
                    token_lists[skip].append(generated)
            except (KeyError, TypeError, ProtocolError) as exc:
                failed[index] = f"malformed engine reply: {exc!r}"
        for skip in (True, False):
            texts = self._run_detokenizer(token_lists[skip], skip)
            for (index, request, field), text in zip(jobs[skip], texts, strict=True):
                if isinstance(text, Exception):
                    failed.setdefault(index, f"cannot detokenize: {text}")
                else:
                    request[field] = text
        if strict and failed:
            raise ProtocolError(ErrorCode.MALFORMED, next(iter(failed.values())))
        return failed

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token id's own text (special tokens kept), in one batched call: the keys of
        Megatron's top-N log-prob dicts."""
        texts = self._run_detokenizer([[t] for t in token_ids], skip_special_tokens=False)
        return [t if isinstance(t, str) else str(i) for t, i in zip(texts, token_ids, strict=True)]

    def _run_detokenizer(
        self, token_lists: list[list[int]], skip_special_tokens: bool
    ) -> list[Any]:
        """Batch-detokenize; on failure retry one by one so one bad list fails only itself."""
        if not token_lists:
            return []
        try:
            return list(self._detokenize_batch[skip_special_tokens](token_lists))
        except Exception:
            detokenize = self.detokenize if skip_special_tokens else self.detokenize_keeping_special
            results: list[Any] = []
            for tokens in token_lists:
                try:
                    results.append(detokenize(tokens))
                except Exception as exc:
                    results.append(exc)
            return results
