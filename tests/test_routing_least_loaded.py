"""LeastLoaded: token accounting, burst spreading, heartbeat correction, determinism."""

from __future__ import annotations

import random

import pytest

from megatron_coord.coordinator.routing import LeastLoaded, RoutingPolicy, make_policy

A, B, C, D = b"a", b"b", b"c", b"d"


def route(policy: LeastLoaded, request_id: int, prompt, budget: int) -> bytes:
    engine = policy.choose()
    policy.on_submit(engine, request_id, prompt, budget)
    return engine


def test_a_burst_is_spread_and_ties_go_round_robin():
    policy = make_policy("least_loaded", [A, B, C, D])
    assert isinstance(policy, LeastLoaded) and policy.tracks_load
    chosen = [route(policy, i, [1] * 10, 10) for i in range(8)]
    assert chosen == [A, B, C, D, A, B, C, D]
    assert policy.loads() == {A: 40, B: 40, C: 40, D: 40}


def test_work_is_counted_in_tokens_not_requests():
    policy = LeastLoaded([A, B])
    assert route(policy, 0, [1] * 100, 900) == A  # 1000 tokens on A
    # Small requests all go to B until B holds as much work as A.
    small = [route(policy, i, [1] * 10, 90) for i in range(1, 11)]
    assert small == [B] * 10
    assert policy.loads() == {A: 1000, B: 1000}
    assert route(policy, 11, [1], 1) == A  # tie: round robin continues after B


def test_streamed_tokens_and_finishes_take_work_off():
    policy = LeastLoaded([A])
    route(policy, 0, [1] * 10, 20)
    assert policy.load(A) == 30
    policy.on_tokens(A, 0, 5)  # the first streamed token proves the prompt was prefilled
    assert policy.load(A) == 15
    policy.on_tokens(A, 0, 5)
    assert policy.load(A) == 10
    policy.on_finish(A, 0, generated=12)  # stopped early (end of text)
    assert policy.load(A) == 0
    policy.on_finish(A, 0, generated=12)  # a second end of the same request changes nothing
    assert policy.load(A) == 0


def test_heartbeats_correct_only_what_replies_did_not_show():
    policy = LeastLoaded([A, B])
    policy.on_load_report(A, {"processed_tokens": 0})  # the baseline: a fresh engine
    route(policy, 0, [1] * 10, 20)  # A: 30 tokens, not streaming
    assert policy.load(A) == 30
    policy.on_load_report(A, {"processed_tokens": 15})  # prefill + 5 tokens done on A
    assert policy.load(A) == 15
    # The final record shows those same tokens again: they must not be taken off twice.
    policy.on_finish(A, 0, generated=20)
    assert policy.load(A) == 0
    route(policy, 1, [1] * 10, 10)  # one request of 20 tokens on each engine
    route(policy, 2, [1] * 10, 10)
    assert policy.loads() == {A: 20, B: 20}
    # A stale report (older than the replies already seen) never lowers the load.
    policy.on_load_report(A, {"processed_tokens": 30})
    assert policy.load(A) == 20
    policy.on_load_report(A, {"processed_tokens": 35})  # 5 unseen tokens of request 1 or 2
    assert policy.load(A) == 15


def test_heartbeat_and_streaming_together_do_not_double_count():
    policy = LeastLoaded([A])
    policy.on_load_report(A, {"processed_tokens": 0})
    route(policy, 0, [1] * 10, 20)
    policy.on_tokens(A, 0, 5)  # seen: 10 prompt + 5 generated
    policy.on_load_report(A, {"processed_tokens": 15})
    assert policy.load(A) == 15
    policy.on_load_report(A, {"processed_tokens": 18})
    assert policy.load(A) == 12
    policy.on_tokens(A, 0, 3)  # the 3 tokens the report already counted
    assert policy.load(A) == 12


def test_bad_reports_are_ignored():
    policy = LeastLoaded([A])
    route(policy, 0, [1] * 4, 4)
    for report in (
        {},
        {"processed_tokens": -3},
        {"processed_tokens": "9"},
        {"processed_tokens": 1.5},
    ):
        policy.on_load_report(A, report)
        assert policy.load(A) == 8
    policy.on_load_report(b"unknown", {"processed_tokens": 5})  # no such engine: ignored


def test_text_prompts_are_estimated_then_corrected_and_calibrated():
    policy = LeastLoaded([A, B])
    route(policy, 0, "x" * 40, 0)  # 4 characters per token until measured: 10
    assert policy.load(A) == 10
    policy.on_prompt_tokens(0, 40)  # one token per character (a byte tokenizer)
    assert policy.load(A) == 40
    policy.on_prompt_tokens(0, 7)  # only the first tokenization counts
    assert policy.load(A) == 40
    route(policy, 1, "y" * 20, 0)  # now estimated at the measured 1 token per character
    assert policy.load(B) == 20


def test_engines_leave_and_join():
    policy = LeastLoaded([A, B, C])
    route(policy, 0, [1], 100)
    policy.remove_engine(A)
    assert policy.engines == [B, C]
    policy.on_finish(A, 0, generated=100)  # a request of the engine that left: ignored
    policy.add_engine(D)
    assert [route(policy, i, [1], 1) for i in range(1, 4)] == [B, C, D]
    with pytest.raises(LookupError, match="no engine"):
        LeastLoaded().choose()


def _replay(seed: int, interleave_timing: bool) -> list[bytes]:
    """Route a fixed request sequence; with ``interleave_timing`` feed random replies/reports."""
    requests = random.Random(0)
    noise = random.Random(seed)
    policy = make_policy("least_loaded", [A, B, C], deterministic=True)
    chosen = []
    for request_id in range(200):
        prompt = [1] * requests.randint(1, 50) if request_id % 3 else "t" * requests.randint(1, 90)
        engine = route(policy, request_id, prompt, requests.randint(0, 500))
        chosen.append(engine)
        if interleave_timing:
            policy.on_prompt_tokens(request_id, noise.randint(1, 99))
            policy.on_tokens(engine, request_id, noise.randint(1, 5))
            policy.on_load_report(engine, {"processed_tokens": noise.randint(0, 10**6)})
            if noise.random() < 0.5:
                policy.on_finish(engine, request_id, generated=noise.randint(0, 500))
    return chosen


def test_deterministic_mode_is_a_pure_function_of_the_request_sequence():
    base = _replay(0, interleave_timing=False)
    assert _replay(1, interleave_timing=True) == base
    assert _replay(2, interleave_timing=True) == base
    assert len(set(base)) == 3  # and it still balances


def test_a_resubmitted_request_moves_its_whole_size():
    policy = LeastLoaded([A, B, C])
    route(policy, 0, [1] * 10, 30)  # A: 40
    policy.remove_engine(A)  # A died; the coordinator resends the request to B
    policy.on_resubmit(A, B, 0)
    assert policy.loads() == {B: 40, C: 0}
    policy.on_finish(B, 0, generated=30)
    assert policy.loads() == {B: 0, C: 0}
    base = RoutingPolicy([A, B])  # the default hook is finish + submit
    base.on_resubmit(A, B, 0)


def test_an_engine_that_comes_back_reports_from_a_new_baseline():
    """processed_tokens counts from the engine process's start: an engine that re-registers
    (declared dead while hung, then back) must not look idle for all its past work."""
    policy = LeastLoaded([A, B])
    policy.remove_engine(A)
    policy.add_engine(A)
    policy.on_submit(A, 0, [1] * 10, 20)  # A: 30
    policy.on_load_report(A, {"processed_tokens": 5000})  # first report after joining: baseline
    assert policy.load(A) == 30
    policy.on_load_report(A, {"processed_tokens": 5012})  # 12 tokens of progress since
    assert policy.load(A) == 18
    policy.on_load_report(A, {"processed_tokens": 3})  # a restarted process: new baseline
    assert policy.load(A) == 30
