"""``POST /tokenize`` and ``POST /detokenize``, as vLLM serves them (outside /v1).

Served where the server has a tokenizer (the launch's checkpoint, ``--tokenizer``): a prompt
or chat messages to token ids (``count``, ``max_model_len``, ``tokens``, optionally
``token_strs``), and token ids back to text. lm-evaluation-harness's remote tokenizer and
benchmark clients that build exact-length prompts use them.
"""

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import Field, WithJsonSchema

from .chat_template import render_chat_prompt
from .openai_protocol import ChatMessage, OpenAIError, StrictModel, token_ids_type
from .schemas import DetokenizeResponse, TokenizeResponse, route_responses


def _tokenize_models(model_name: str, token_max: int) -> tuple[type, type, type]:
    name_type = Annotated[
        Literal[model_name], WithJsonSchema({"type": "string", "enum": [model_name]})
    ]

    class TokenizeCompletionRequest(StrictModel):
        model: name_type | None = None
        prompt: str
        add_special_tokens: bool = True
        return_token_strs: bool | None = False

    class TokenizeChatRequest(StrictModel):
        model: name_type | None = None
        messages: Annotated[list[ChatMessage], Field(min_length=1)]
        add_generation_prompt: bool = True
        add_special_tokens: bool = False
        return_token_strs: bool | None = False

    class DetokenizeRequest(StrictModel):
        model: name_type | None = None
        tokens: token_ids_type(token_max)

    return TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``; special tokens (BOS) added where asked and the tokenizer is a
    Hugging Face one (the generation endpoints add none)."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return list(hf.encode(text, add_special_tokens=add_special_tokens))
    return list(tokenizer.tokenize(text))


def _token_strs(tokenizer: Any, tokens: list[int]) -> list[str]:
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return [str(t) for t in hf.convert_ids_to_tokens(tokens)]
    return [tokenizer.detokenize([t]) for t in tokens]


def install_tokenize_routes(app: FastAPI, state: Any) -> None:
    """Add /tokenize and /detokenize (only where ``state`` has a tokenizer)."""
    tokenizer = state.tokenizer
    if tokenizer is None:
        return
    completion_model, chat_model, detokenize_model = _tokenize_models(
        state.opts.model_name, state.limits.token_id_max
    )
    errors = (400, 404, 413)
    tokenize_body = completion_model | chat_model

    @app.post("/tokenize", responses=route_responses(TokenizeResponse, errors))
    async def tokenize(body: tokenize_body) -> Response:
        """A prompt, or chat messages rendered as the chat endpoint does, to token ids."""
        if isinstance(body, chat_model):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                text = render_chat_prompt(messages, tokenizer, body.add_generation_prompt)
            except ValueError as exc:
                raise OpenAIError(400, str(exc), param="messages") from None
        else:
            text = body.prompt
        try:
            tokens = _encode(tokenizer, text, body.add_special_tokens)
            strs = _token_strs(tokenizer, tokens) if body.return_token_strs else None
        except Exception as exc:  # e.g. a lone surrogate the tokenizer cannot encode
            raise OpenAIError(400, f"cannot tokenize: {exc}", param="prompt") from None
        answer: dict[str, Any] = {
            "count": len(tokens),
            "max_model_len": state.limits.max_model_len,
            "tokens": tokens,
        }
        if strs is not None:
            answer["token_strs"] = strs
        return JSONResponse(answer)

    @app.post("/detokenize", responses=route_responses(DetokenizeResponse, errors))
    async def detokenize(body: detokenize_model) -> Response:
        """Token ids to text."""
        try:
            text = tokenizer.detokenize(body.tokens)
        except Exception as exc:
            raise OpenAIError(400, f"cannot detokenize: {exc}", param="tokens") from None
        return JSONResponse({"prompt": text})
