"""The OpenAI API's requests: validation, and the mapping of their fields to ``SamplingParams``.

Kept apart from the HTTP plumbing (``app``, ``inference``) so the mapping from OpenAI's (and
vLLM's) fields to Megatron's ``SamplingParams`` can be read -- and tested -- in one place.
Request models are strict and forbid unknown fields, as OpenAI's API does: a misspelt parameter
or a string where a number belongs is an error, not silently coerced or ignored. Every bound
is a field constraint, so the OpenAPI document states exactly what is enforced; the models a
server validates with (``request_models``) add its model's bounds (served name, vocabulary,
context) to the defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    create_model,
    field_validator,
)

from ..sampling_params import (
    BOUNDS,
    MAX_ABS_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_N_LOGPROBS,
    SamplingParams,
)
from .bounds import MAX_INT64, ServedLimits, decimal_below

MAX_STOP_SEQUENCES = 16
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 16  # n and best_of: each candidate is one engine request
MAX_PROMPTS = 64  # a batch of prompts in one /v1/completions call
# The engine's own bounds (sampling_params.py), so the document states what is enforced.
MAX_TOP_LOGPROBS = MAX_TOP_N_LOGPROBS
MAX_LOGIT_BIAS = MAX_LOGIT_BIAS_ENTRIES
LOGIT_BIAS_LIMIT = MAX_ABS_LOGIT_BIAS


class OpenAIError(Exception):
    """An error to send back in OpenAI's shape, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it."""
        return error_body(self.message, self.err_type, self.param, self.code)


def error_body(
    message: str, err_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


class StrictModel(BaseModel):
    """Strict (no coercion), no unknown fields, finite floats: what every request model is."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- bounded types


def _integral_float(low: int, high: int) -> Any:
    """A float with no fraction, within [low, high], as an int: JSON Schema's integers
    include 1.0 (bounds checked after the conversion, where 2**63 - 1 is exact; an int
    never gets here to be rounded)."""

    def to_int(value: Any) -> int:
        if type(value) is not float or not value.is_integer() or not low <= int(value) <= high:
            raise ValueError(f"Input should be an integer in [{low}, {high}]")
        return int(value)

    return Annotated[float, PlainValidator(to_int)]


def _int(low: int, high: int = MAX_INT64) -> Any:
    """An integer in [low, high]: an int (validated in Rust, the fast path) or an integral
    float; the document says integer."""
    schema = {"type": "integer", "minimum": low, "maximum": high}
    exact = Annotated[int, Field(ge=low, le=high)]
    return Annotated[exact | _integral_float(low, high), WithJsonSchema(schema)]


def _ints(low: int, high: int, **length: Any) -> Any:
    """A list of bounded integers."""
    return Annotated[list[_int(low, high)], Field(**length)]


def _float(low: float, high: float) -> Any:
    return Annotated[float, Field(ge=low, le=high)]


Text = Annotated[str, Field(min_length=1)]


def _token_ids(token_max: int, max_len: int | None) -> Any:
    return _ints(0, token_max, min_length=1, max_length=max_len)


def _prompt_type(token_max: int, max_len: int | None) -> Any:
    """A text, a token list, or a batch (1..MAX_PROMPTS) of either, none empty."""
    ids = _token_ids(token_max, max_len)
    batch = {"min_length": 1, "max_length": MAX_PROMPTS}
    return Text | ids | Annotated[list[Text], Field(**batch)] | Annotated[list[ids], Field(**batch)]


def token_ids_type(token_max: int) -> Any:
    """Token ids in [0, token_max] (an empty list too)."""
    return _ints(0, token_max)


def _stop_token_ids_type(token_max: int) -> Any:
    return _ints(0, token_max, max_length=MAX_STOP_TOKEN_IDS) | None


def _logit_bias_type(token_max: int) -> Any:
    """OpenAI's logit_bias: token ids as decimal strings -> a bias in [-100, 100]."""
    key = decimal_below(token_max + 1)
    bias = _float(-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)
    schema = {
        "anyOf": [
            {
                "type": "object",
                "propertyNames": {"pattern": key},
                "additionalProperties": {
                    "type": "number",
                    "minimum": -LOGIT_BIAS_LIMIT,
                    "maximum": LOGIT_BIAS_LIMIT,
                },
                "maxProperties": MAX_LOGIT_BIAS,
            },
            {"type": "null"},
        ]
    }
    mapping = Annotated[
        dict[Annotated[str, Field(pattern=key)], bias], Field(max_length=MAX_LOGIT_BIAS)
    ]
    return Annotated[mapping | None, WithJsonSchema(schema)]


def _model_name_type(name: str | None) -> Any:
    if name is None:
        return str
    return Annotated[Literal[name], WithJsonSchema({"type": "string", "enum": [name]})]


# --------------------------------------------------------------------------- requests


class StreamOptions(StrictModel):
    include_usage: bool | None = False


class TextResponseFormat(StrictModel):
    type: Literal["text"]


# stream_options needs stream: true (as OpenAI says); in the schema, so generated clients and
# schema-driven testers know it too.
_STREAM_OPTIONS_NEED_STREAM = {
    "if": {
        "required": ["stream_options"],
        "properties": {"stream_options": {"type": "object"}},
    },
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}


class _SamplingFields(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions (null means the default)."""

    model_config = ConfigDict(json_schema_extra=_STREAM_OPTIONS_NEED_STREAM)

    model: str
    max_tokens: _int(0) | None = None
    temperature: _float(0.0, 2.0) | None = None
    top_p: _float(0.0, 1.0) | None = None
    n: _int(1, MAX_CHOICES) | None = None
    seed: _int(-(2**63)) | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    presence_penalty: _float(*BOUNDS["presence_penalty"]) | None = None
    frequency_penalty: _float(*BOUNDS["frequency_penalty"]) | None = None
    logit_bias: _logit_bias_type(MAX_INT64) = None
    user: str | None = None
    # vLLM's (and SGLang's) sampling fields; the openai client sends them in extra_body.
    top_k: _int(-1) | None = None
    min_p: _float(*BOUNDS["min_p"]) | None = None
    repetition_penalty: _float(*BOUNDS["repetition_penalty"]) | None = None
    ignore_eos: bool = False
    min_tokens: _int(0) = 0
    stop_token_ids: _stop_token_ids_type(MAX_INT64) = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: _int(0, MAX_TOP_LOGPROBS) | None = None

    @field_validator("stop")
    @classmethod
    def _stop_as_list(cls, value: str | list[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    def check_supported(self) -> None:
        """Refuse what the schema states but pydantic does not check (across fields)."""
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )

    @property
    def choices(self) -> int:
        return self.n if self.n is not None else 1

    def candidates(self) -> int:
        """Engine requests per prompt: ``best_of`` when larger than ``n``."""
        return self.choices

    def wants_logprobs(self) -> bool:
        """Whether the answer carries the generated tokens' log-probabilities."""
        return False

    def generated_top_n(self) -> int:
        """Alternatives per generated token in the answer."""
        return 0

    def prompt_top_n(self) -> int | None:
        """Alternatives per prompt position in the answer (None: no prompt log-probs)."""
        return self.prompt_logprobs

    def streams_incrementally(self) -> bool:
        """False where the answer needs the whole generation (log-probs, echo, best_of):
        such a stream sends each choice in one chunk once it is complete."""
        return (
            not self.wants_logprobs()
            and self.prompt_top_n() is None
            and self.candidates() == self.choices
        )

    def include_usage(self) -> bool:
        return bool(self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: _prompt_type(MAX_INT64, None)
    max_tokens: _int(0) | None = DEFAULT_MAX_TOKENS
    echo: bool | None = False
    logprobs: _int(0, MAX_TOP_LOGPROBS) | None = None
    best_of: _int(1, MAX_CHOICES) | None = None
    suffix: Annotated[str, Field(max_length=0)] | None = None  # not served: only empty

    def candidates(self) -> int:
        return max(self.choices, self.best_of or 1)

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def generated_top_n(self) -> int:
        return self.logprobs or 0

    def echo_logprobs(self) -> bool:
        """echo with logprobs: the prompt's log-probs come first in the logprobs object."""
        return bool(self.echo) and self.logprobs is not None

    def prompt_top_n(self) -> int | None:
        wanted = [n for n in (self.prompt_logprobs,) if n is not None]
        if self.echo_logprobs():
            wanted.append(self.logprobs)
        return max(wanted) if wanted else None

    def streams_incrementally(self) -> bool:
        return super().streams_incrementally() and not self.echo

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one entry per prompt of a batch."""
        p = self.prompt
        # Pydantic already checked that ``p`` is one of the four shapes, none empty, so the
        # first element tells which (no need to walk a long token list again).
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: _int(0) | None = None
    logprobs: bool | None = False
    # Ignored unless logprobs is true.
    top_logprobs: _int(0, MAX_TOP_LOGPROBS) | None = None
    # Tools are not served: only an empty list, or tool_choice "none".
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    response_format: TextResponseFormat | None = None

    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def generated_top_n(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def max_new_tokens(self, default: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens if self.max_tokens is not None else default

    def explicit_max_tokens(self) -> bool:
        return self.max_completion_tokens is not None or self.max_tokens is not None


@dataclass(frozen=True)
class RequestModels:
    """The request models one server validates with (its model's bounds in the types)."""

    completion: type[CompletionRequest]
    chat: type[ChatCompletionRequest]


def request_models(limits: ServedLimits) -> RequestModels:
    """Request models with ``limits``' served name, token ids, context and max_tokens bounds."""
    token_max = limits.token_id_max
    max_new = limits.max_new_tokens
    shared: dict[str, Any] = {
        "model": (_model_name_type(limits.model_name), ...),
        "max_tokens": (_int(0, max_new) | None, None),
        "stop_token_ids": (_stop_token_ids_type(token_max), None),
        "logit_bias": (_logit_bias_type(token_max), None),
    }
    completion = create_model(
        "CompletionRequest",
        __base__=CompletionRequest,
        __module__=__name__,
        **{
            **shared,
            "max_tokens": (_int(0, max_new) | None, DEFAULT_MAX_TOKENS),
            "prompt": (_prompt_type(token_max, limits.max_prompt_tokens), ...),
        },
    )
    chat = create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        __module__=__name__,
        **shared,
        max_completion_tokens=(_int(0, max_new) | None, None),
    )
    return RequestModels(completion, chat)


# --------------------------------------------------------------------------- sampling params


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def to_sampling_params(
    req: _SamplingFields,
    max_new_tokens: int,
    choice_index: int,
    termination_id: int | None,
    vocab_size: int | None = None,
) -> SamplingParams:
    """Megatron sampling parameters for one choice of ``req``.

    OpenAI's ``temperature=0`` (or ``top_p=0``) means greedy, which Megatron spells ``top_k=1``;
    OpenAI's ``top_p=1`` means "no nucleus filtering", which Megatron spells ``top_p=0``, and
    vLLM's ``top_k=-1`` (or one at least the vocabulary) is Megatron's ``top_k=0``. With
    ``n > 1`` and a seed, choice ``i`` uses ``seed + i`` so the choices differ yet stay
    reproducible. Log-probs: generated ones when the answer shows them (or best_of ranks by
    them), the prompt's for echo or prompt_logprobs; one top-N serves both (the larger).
    """
    temperature, top_p = _or(req.temperature, 1.0), _or(req.top_p, 1.0)
    top_k = _or(req.top_k, 0)
    if top_k < 0 or (vocab_size is not None and top_k >= vocab_size):
        top_k = 0
    greedy = temperature == 0.0 or top_p == 0.0 or top_k == 1
    params = SamplingParams(
        temperature=1.0 if greedy else temperature,
        top_k=1 if greedy else top_k,
        top_p=0.0 if greedy or top_p >= 1.0 else top_p,
        num_tokens_to_generate=max_new_tokens,
        termination_id=termination_id,
        ignore_eos=req.ignore_eos,
        min_tokens=min(req.min_tokens, max_new_tokens),
        stop_token_ids=req.stop_token_ids or None,
        min_p=_or(req.min_p, 0.0),
        presence_penalty=_or(req.presence_penalty, 0.0),
        frequency_penalty=_or(req.frequency_penalty, 0.0),
        repetition_penalty=_or(req.repetition_penalty, 1.0),
        logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
    )
    if req.seed is not None:
        params.seed = (req.seed + choice_index + 2**63) % 2**64 - 2**63
    prompt_n = req.prompt_top_n()
    if req.wants_logprobs() or prompt_n is not None or req.candidates() > req.choices:
        params.return_log_probs = True
        params.skip_prompt_log_probs = prompt_n is None
    top_n = max(req.generated_top_n(), prompt_n or 0)
    if top_n:
        params.top_n_logprobs = top_n
        params.return_prompt_top_n_logprobs = bool(prompt_n)
    return params
