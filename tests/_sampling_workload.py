"""A workload for the prompt log-prob and sampling-field tests, run in process (TP=1) and by
tests/_sampling_tp_worker.py at TP=2, where every group of requests travels through the real
TP broadcast (TPBroadcaster) before the engines see it.

Groups run one after the other (each to completion): a plain request fills the prefix cache
with PROMPT; then prompt log-probs and top-N (two rows batched on one length, one on another);
then PROMPT again (a cache hit when caching is on); then every sampling field at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_coord.engine.tp_broadcast import NewRequest, StepInputs
from megatron_coord.sampling_params import SamplingParams

BLOCK = 8
EOS = 50256
PROMPT = [(i * 7919) % 50000 + 11 for i in range(37)]
SCORES = {"return_log_probs": True, "top_n_logprobs": 3, "return_prompt_top_n_logprobs": True}
EVERYTHING = {
    "temperature": 0.8,
    "top_k": 50,
    "top_p": 0.9,
    "min_p": 0.02,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.3,
    "logit_bias": {EOS: 5.0, 42: 2.0},
    "min_tokens": 3,
    "stop_token_ids": [7],
}
GROUPS: list[list[tuple[int, list[int], dict[str, Any]]]] = [
    [(0, PROMPT, {"top_k": 1, "num_tokens_to_generate": 4})],
    [
        (1, PROMPT, {"top_k": 1, "num_tokens_to_generate": 4, **SCORES}),
        (2, PROMPT[:20], {"top_k": 1, "num_tokens_to_generate": 3, "return_log_probs": True}),
        (3, PROMPT, {"temperature": 0.7, "top_p": 0.95, "num_tokens_to_generate": 4, **SCORES}),
    ],
    [(4, PROMPT, {"top_k": 1, "num_tokens_to_generate": 4})],
    [
        (5, PROMPT[:9], {**EVERYTHING, "num_tokens_to_generate": 10, **SCORES}),
        (6, [5, 6], {"top_k": 1, "repetition_penalty": 1.5, "logit_bias": {3: 1.0}}),
        (
            7,
            [8, 9, 10],
            {"ignore_eos": True, "logit_bias": {EOS: 100.0}, "num_tokens_to_generate": 6},
        ),
        (8, [8, 9], {"min_tokens": 4, "logit_bias": {EOS: 100.0}, "temperature": 1.0}),
    ],
]


def _summary(request: dict[str, Any]) -> dict[str, Any]:
    """A record as JSON can hold it (top-N keys as strings)."""

    def keyed(dicts):
        return None if dicts is None else [{str(k): v for k, v in d.items()} for d in dicts]

    return {
        "generated_tokens": request["generated_tokens"],
        "finish_reason": request["finish_reason"],
        "generated_log_probs": request["generated_log_probs"],
        "prompt_log_probs": request["prompt_log_probs"],
        "generated_top_n_logprobs": keyed(request["generated_top_n_logprobs"]),
        "prompt_top_n_logprobs": keyed(request["prompt_top_n_logprobs"]),
        "cached_tokens": request["cached_tokens"],
    }


def run_workload(
    engine: Any,
    exchange: Callable[[StepInputs | None], StepInputs] = lambda inputs: inputs,
    is_source: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every group; ``exchange`` moves each group's inputs (from the source rank)."""
    out = {}
    for group in GROUPS:
        inputs = None
        if is_source:
            requests = [
                NewRequest(rid, prompt, SamplingParams(**params), 1000 + rid)
                for rid, prompt, params in group
            ]
            inputs = StepInputs([], requests)
        for new in exchange(inputs).requests:
            engine.add_request(new)
        while engine.has_work:
            for record in engine.step().finished:
                (request,) = record["requests"]
                out[str(request["request_id"])] = _summary(request)
    return out
