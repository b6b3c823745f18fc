"""The OpenAI mapping pieces of the HTTP front end, without a server: sampling parameters, stop
strings, prompt shapes, chat templates, record parsing and error statuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from megatron_coord.sampling_params import validate_sampling_params
from megatron_coord.serving.chat_template import render_chat_prompt, render_default_template
from megatron_coord.serving.errors import openai_error
from megatron_coord.serving.generation import GenerationError, record_view
from megatron_coord.serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    to_sampling_params,
)
from megatron_coord.serving.stop_strings import StopMatcher


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(model="m", prompt="p", **fields)


# --------------------------------------------------------------------------- sampling params


def test_temperature_zero_is_greedy() -> None:
    p = to_sampling_params(completion(temperature=0, top_p=0.3), 9, 0, None)
    assert (p.top_k, p.temperature, p.top_p, p.num_tokens_to_generate) == (1, 1.0, 0.0, 9)


def test_top_p_one_means_no_filtering() -> None:
    p = to_sampling_params(completion(temperature=0.7), 4, 0, 50256)
    assert (p.top_k, p.temperature, p.top_p, p.termination_id) == (0, 0.7, 0.0, 50256)
    assert to_sampling_params(completion(top_p=0.9), 4, 0, None).top_p == 0.9
    assert to_sampling_params(completion(top_k=-1), 4, 0, None).top_k == 0
    assert to_sampling_params(completion(top_k=1, temperature=1.3), 4, 0, None).top_k == 1


def test_logprobs_ask_the_engine_for_sampled_token_log_probs() -> None:
    p = to_sampling_params(completion(logprobs=0), 4, 0, None)
    assert p.return_log_probs and p.skip_prompt_log_probs
    assert not to_sampling_params(completion(), 4, 0, None).return_log_probs
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    assert not to_sampling_params(chat, 4, 0, None).return_log_probs
    chat.logprobs = True
    assert to_sampling_params(chat, 4, 0, None).return_log_probs


def test_seed_per_choice_stays_in_int64() -> None:
    assert to_sampling_params(completion(seed=7), 1, 2, None).seed == 9
    assert to_sampling_params(completion(), 1, 2, None).seed is None
    top = 2**63 - 1
    assert to_sampling_params(completion(seed=top), 1, 1, None).seed == -(2**63)


@given(
    temperature=st.floats(0, 2),
    top_p=st.floats(0, 1),
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    choice=st.integers(0, 15),
    penalty=st.floats(-2, 2),
    bias=st.dictionaries(st.integers(0, 2**63 - 1).map(str), st.floats(-100, 100), max_size=3),
    min_tokens=st.integers(0, 2**63 - 1),
)
def test_mapped_params_always_pass_the_coordinators_validation(
    temperature: float,
    top_p: float,
    seed: int | None,
    choice: int,
    penalty: float,
    bias: dict[str, float],
    min_tokens: int,
) -> None:
    request = completion(
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        presence_penalty=penalty,
        frequency_penalty=penalty,
        logit_bias=bias,
        min_tokens=min_tokens,
    )
    params = to_sampling_params(request, 16, choice, None)
    validate_sampling_params(params.serialize())  # raises if the coordinator would refuse it


def test_vllm_fields_map_onto_sampling_params() -> None:
    p = to_sampling_params(
        completion(
            ignore_eos=True,
            min_tokens=50,
            stop_token_ids=[3, 4],
            min_p=0.1,
            presence_penalty=0.5,
            frequency_penalty=-0.25,
            repetition_penalty=1.1,
            logit_bias={"5": 2, "7": -100.0},
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            top_k=300,
        ),
        8,
        0,
        0,
        vocab_size=256,
    )
    assert (p.ignore_eos, p.min_tokens, p.stop_token_ids, p.min_p) == (True, 8, [3, 4], 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.25, 1.1)
    assert p.logit_bias == {5: 2.0, 7: -100.0}
    assert p.include_stop_str_in_output and not p.skip_special_tokens
    assert p.top_k == 0  # at least the vocabulary: no filtering
    defaults = to_sampling_params(completion(), 8, 0, None)
    assert (defaults.ignore_eos, defaults.min_tokens, defaults.logit_bias) == (False, 0, None)
    assert (defaults.repetition_penalty, defaults.skip_special_tokens) == (1.0, True)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # (return_log_probs, skip_prompt_log_probs, top_n_logprobs, return_prompt_top_n)
        ({"logprobs": 4}, (True, True, 4, False)),
        ({"echo": True, "logprobs": 3}, (True, False, 3, True)),
        ({"echo": True, "logprobs": 0}, (True, False, 0, False)),
        ({"echo": True}, (False, False, 0, False)),
        ({"prompt_logprobs": 2, "logprobs": 5}, (True, False, 5, True)),
        ({"prompt_logprobs": 0}, (True, False, 0, False)),
        ({"best_of": 3}, (True, True, 0, False)),  # best_of ranks by log-probs
    ],
)
def test_log_prob_requests_map_onto_megatrons_fields(fields: dict, expected: tuple) -> None:
    p = to_sampling_params(completion(**fields), 4, 0, None)
    got = (p.return_log_probs, p.skip_prompt_log_probs, p.top_n_logprobs)
    assert (*got, p.return_prompt_top_n_logprobs) == expected


# --------------------------------------------------------------------------- stop strings


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Character by character: stop at the first position where some stop string ends."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(len(s) for s in ending)], True
    return text, False


@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_stop_matcher_equals_cutting_the_whole_text(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    """However the text is split into pieces, the output is the text cut at the stop string
    completed first (as if generated one character at a time)."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    out += matcher.flush()
    assert (out, matcher.stopped) == reference_cut(text, stops)


def test_stop_completed_first_wins() -> None:
    # "c" is complete before "aca" could be: a generation would have stopped there.
    for pieces in (["aca"], ["ac", "a"], ["a", "c", "a"]):
        m = StopMatcher(["c", "aca"])
        assert "".join(m.feed(p) for p in pieces) + m.flush() == "a"


def test_stop_matcher_holds_back_a_possible_start() -> None:
    m = StopMatcher(["END"])
    assert m.feed("abcE") == "abc"
    assert m.feed("N") == ""
    assert m.feed("x") == "ENx"
    assert m.feed("yEND tail") == "y"
    assert m.stopped and m.feed("more") == "" and m.flush() == ""


# --------------------------------------------------------------------------- request shapes


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("text", ["text"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["a", "b"], ["a", "b"]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_shapes(prompt, expected) -> None:
    assert CompletionRequest(model="m", prompt=prompt).prompts() == expected


@pytest.mark.parametrize("prompt", ["", [], [[]], ["a", ""], ["x"] * 65])
def test_empty_or_huge_prompts_are_refused(prompt) -> None:
    """Bounds in the schema (so the OpenAPI document states them): a 400 naming prompt."""
    with pytest.raises(ValidationError) as info:
        CompletionRequest(model="m", prompt=prompt)
    assert {e["loc"][0] for e in info.value.errors()} == {"prompt"}


def test_prompts_and_choices_are_bounded_each() -> None:
    """64 prompts x 16 choices is the most (each bound a schema bound: no product rule)."""
    assert len(CompletionRequest(model="m", prompt=["x"] * 64, n=16).prompts()) == 64
    for fields in ({"prompt": ["x"] * 65}, {"prompt": "x", "n": 17}):
        with pytest.raises(ValidationError):
            CompletionRequest(**{"model": "m", **fields})


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": [1.5]},
        {"prompt": [True]},
        {"prompt": "x", "max_tokens": "3"},
        {"prompt": "x", "temperature": 2.5},
        {"prompt": "x", "stop": [""]},
        {"prompt": "x", "seed": 2**64},
        {"prompt": "x", "unknown": 1},
        {"prompt": "x", "model": None},
    ],
)
def test_invalid_fields_are_rejected(fields) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(**{"model": "m", **fields})


def test_unsupported_options_say_so() -> None:
    for fields, param in [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ]:
        with pytest.raises(OpenAIError) as info:
            completion(**fields).check_supported()
        assert info.value.param == param and info.value.status == 400
    # Served since issue 23: echo, top-N log-probs, penalties, logit_bias.
    for fields in (
        {"echo": True},
        {"logprobs": 5},
        {"presence_penalty": 0.5},
        {"logit_bias": {"1": 2.0}},
    ):
        completion(**fields).check_supported()
    # Tools are not served: the schema says only an empty list.
    with pytest.raises(ValidationError):
        ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]
        )


def test_chat_max_tokens_precedence() -> None:
    msgs = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest(model="m", messages=msgs).max_new_tokens(99) == 99
    assert ChatCompletionRequest(model="m", messages=msgs, max_tokens=5).max_new_tokens(99) == 5
    both = ChatCompletionRequest(model="m", messages=msgs, max_tokens=5, max_completion_tokens=7)
    assert both.max_new_tokens(99) == 7


# --------------------------------------------------------------------------- chat templates


def test_default_template() -> None:
    text = render_default_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    )
    assert text == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"


def test_tokenizer_chat_template_is_used_when_present() -> None:
    from megatron_coord.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat_prompt(messages, tokenizer) == render_default_template(messages)
    tokenizer.hf_tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert render_chat_prompt(messages, tokenizer) == "[user]hi[assistant]"
    tokenizer.hf_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        render_chat_prompt(messages, tokenizer)


# --------------------------------------------------------------------------- records, errors


def test_record_view_of_megatron_and_resumed_records() -> None:
    record = {
        "requests": [
            {
                "prompt_tokens": ["tensor", [1, 2, 3]],
                "generated_tokens": [4],
                "generated_text": "a",
            },
            {
                "prompt_tokens": [1, 2, 3, 4],
                "generated_tokens": [5, 6],
                "generated_text": "bc",
                "finish_reason": "stop",
            },
        ],
        "latency": 0.1,
    }
    view = record_view(record)
    assert (view.text, view.prompt_tokens, view.completion_tokens) == ("abc", 3, 3)
    assert view.finish_reason == "stop"
    bare = record_view({"prompt_tokens": [1], "generated_tokens": [], "generated_text": None})
    assert (bare.text, bare.prompt_tokens, bare.completion_tokens) == ("", 1, 0)


@pytest.mark.parametrize(
    ("code", "status", "outcome"),
    [
        ("invalid_request", 400, "invalid_request"),
        ("malformed", 400, "invalid_request"),
        ("overloaded", 429, "overloaded"),
        ("no_engine", 503, "no_replica"),
        ("shutting_down", 503, "no_replica"),
        ("timeout", 504, "timeout"),
        ("engine_failed", 500, "error"),
        ("something_new", 500, "error"),
    ],
)
def test_error_codes_map_to_http_statuses(code: str, status: int, outcome: str) -> None:
    error, seen = openai_error(GenerationError(code, "why"))
    assert (error.status, seen) == (status, outcome)
    body = error.body()["error"]
    assert body["message"] == "why" and body["code"] == code


# --------------------------------------------------------------------------- sockets


def test_accepted_connections_get_tcp_nodelay() -> None:
    """Without TCP_NODELAY each keep-alive response waits on Nagle + delayed ACK (~40 ms)."""
    import asyncio
    import socket

    from megatron_coord.serving import bind_socket

    async def accepted_nodelay() -> int:
        listener = bind_socket("127.0.0.1", 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        _, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
