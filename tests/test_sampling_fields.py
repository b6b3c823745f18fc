"""The batched sampler's fields on fixed logits, against hand computations: logit bias,
min-tokens, penalties, min-p, top-k / top-p per row, top-N log-probs, the counter-based noise;
and the fields' validation and their trip through the TP broadcast."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_coord.engine import gumbel
from megatron_coord.engine.logits_processors import (
    apply_penalties,
    filter_logits,
    filter_rows,
    make_filters,
)
from megatron_coord.engine.sampling import Sampler, SamplingState, _make_plan, sample
from megatron_coord.engine.tp_broadcast import NewRequest, StepInputs, pack, unpack
from megatron_coord.protocol import ProtocolError
from megatron_coord.sampling_params import SamplingParams, validate_sampling_params

NEG = float("-inf")


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def _draws(logits: torch.Tensor, state: SamplingState, n: int, sampler=None) -> list[int]:
    sampler = sampler or Sampler(1, logits.shape[-1])
    return [sampler(logits, [state], [False]).tokens[0] for _ in range(n)]


def test_logit_bias_of_100_always_wins_greedy_and_sampled():
    logits = _logits(1, 500) * 3
    target = int(logits[0].argmin())  # the least likely token
    for state in (
        SamplingState(top_k=1, logit_bias={target: 100.0}),
        SamplingState(temperature=1.0, seed=3, logit_bias={target: 100.0}),
        SamplingState(temperature=1.0, seed=4, top_p=0.9, logit_bias={target: 100.0}),
    ):
        assert set(_draws(logits, state, 30)) == {target}
    # A negative bias removes the favourite from a greedy choice.
    best = int(logits[0].argmax())
    assert _draws(logits, SamplingState(top_k=1, logit_bias={best: -100.0}), 1) != [best]


def test_min_tokens_masks_the_stop_ids_until_enough_were_drawn():
    eos, stop = 7, 9
    logits = torch.zeros(1, 20)
    logits[0, eos] = logits[0, stop] = 50.0  # the stop ids are all but certain
    state = SamplingState(min_tokens=3, held_back=frozenset({eos, stop}), temperature=1.0, seed=1)
    drawn = _draws(logits, state, 5)
    assert not {eos, stop} & set(drawn[:3])
    assert set(drawn[3:]) <= {eos, stop}
    # A logit bias cannot lift a masked id.
    greedy = SamplingState(top_k=1, min_tokens=2, held_back=frozenset({eos}), logit_bias={eos: 9})
    assert _draws(logits, greedy, 3)[:2] == [stop, stop]


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    prompt, generated = [0, 4], [3, 3, 2]
    state = SamplingState(
        top_k=1,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=2.0,
        prompt_tokens=prompt,
    )
    sampler = Sampler(1, 6)
    sampler.admit(state)
    for token in generated:  # the state's slot is 0
        sampler.counts.add([0], torch.tensor([0]), torch.tensor([token]))
    # By hand: repetition over prompt + generated (0, 2, 3, 4): / 2 if > 0, * 2 otherwise;
    # then frequency x count + presence over generated (2: once, 3: twice).
    expected = [2.0 / 2, -1.0, 0.5 / 2 - 0.25 - 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0 * 2, 1.0]
    plan = _make_plan([state], 6, torch.device("cpu"))
    work = apply_penalties(logits.clone(), plan.penalties, sampler.counts)
    assert work[0].tolist() == pytest.approx(expected)
    # The choice follows: token 5 (1.0) now beats token 0 (1.0 -> first index wins: 0).
    assert sampler(logits, [state], [False]).tokens == [0]
    assert sampler.counts.counts[0].tolist() == [1, 0, 1, 2, 0, 0]  # the new token counted


def test_frequency_penalty_counts_grow_one_scatter_per_step():
    logits = torch.zeros(2, 5)
    logits[:, 0] = 1.0
    states = [SamplingState(top_k=1, frequency_penalty=0.3, slot=1), SamplingState(top_k=1)]
    sampler = Sampler(2, 5)
    for s in states:
        sampler.admit(s)
    tokens = [sampler(logits, states, [False, False]).tokens for _ in range(6)]
    # Penalized row: 0 until its count makes 1.0 - 0.3 n < 0, then the others in turn.
    assert [t[0] for t in tokens] == [0, 0, 0, 0, 1, 2]
    assert [t[1] for t in tokens] == [0] * 6  # unpenalized neighbour unaffected
    assert sampler.counts.counts[1].tolist() == [4, 1, 1, 0, 0]


def test_min_p_keeps_tokens_above_its_share_of_the_top_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    spec = make_filters([0], [0.0], [0.35], 4, torch.device("cpu"))
    kept = torch.isfinite(filter_rows(torch.log(probs)[None].clone(), spec))[0].tolist()
    assert kept == [True, True, False, False]  # 0.15 < 0.35 * 0.5 = 0.175
    state = SamplingState(temperature=1.0, min_p=0.35, seed=2)
    assert set(_draws(torch.log(probs)[None], state, 200)) == {0, 1}
    # After temperature: at T=2 the probabilities flatten and 0.15 passes.
    hot = SamplingState(temperature=2.0, min_p=0.35, seed=2)
    assert set(_draws(torch.log(probs)[None], hot, 300)) == {0, 1, 2}


def test_per_row_top_k_and_top_p_in_one_batch_match_each_row_alone():
    logits = _logits(4, 3000, seed=5) * 2
    params = [(3, 0.0), (0, 0.8), (50, 0.5), (0, 0.0)]
    spec = make_filters([k for k, _ in params], [p for _, p in params], [0.0] * 4, 3000, "cpu")
    batch = torch.isfinite(filter_rows(logits.clone(), spec))
    for row, (k, p) in enumerate(params):
        alone = torch.isfinite(filter_logits(logits[row], k, p))
        assert torch.equal(batch[row], alone), row
    assert batch[0].sum() == 3 and batch[3].all()


def test_a_request_draws_the_same_tokens_whatever_its_batch():
    logits = _logits(4, 400, seed=9)
    mine = dict(temperature=0.9, seed=77, top_k=40, min_p=0.02, presence_penalty=0.4)

    def run(rows: list[int], others: list[dict]) -> list[int]:
        states = [SamplingState(**o, slot=i + 1) for i, o in enumerate(others)]
        me = SamplingState(**mine, slot=0)
        states.insert(0, me)
        sampler = Sampler(len(states), 400)
        for s in states:
            sampler.admit(s)
        out = []
        for _ in range(12):
            out.append(sampler(logits[rows], states, [False] * len(states)).tokens[0])
        return out

    alone = run([0], [])
    crowded = run([0, 1, 2, 3], [dict(top_k=1), dict(temperature=2.0, seed=1), dict(top_p=0.5)])
    assert alone == crowded  # the unfiltered neighbour moves the batch to full-vocabulary noise
    assert len(set(alone)) > 1


def test_noise_depends_on_seed_draw_and_token_only():
    ids = torch.arange(1000)
    a, b = gumbel.key_tensors([5, 5, 6], [0, 1, 0], torch.device("cpu"))
    full = gumbel.noise(a, b, ids)
    picked = torch.tensor([[3, 999, 17], [0, 1, 2], [500, 501, 2]])
    assert torch.equal(gumbel.noise(a, b, picked), full.gather(1, picked))
    assert not torch.equal(full[0], full[1]) and not torch.equal(full[0], full[2])
    u = gumbel.uniforms(*gumbel.key_tensors([1], [0], torch.device("cpu")), torch.arange(200000))
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert torch.isfinite(full).all()


def test_top_n_log_probs_are_the_raw_distributions_best_in_order():
    logits = _logits(2, 50, seed=1)
    states = [SamplingState(top_k=1, top_n=3), SamplingState(temperature=5.0, seed=1, top_n=0)]
    draw = Sampler(2, 50)(logits, states, [True, True])
    lp = torch.log_softmax(logits, -1)
    best = torch.topk(lp[0], 3)
    assert list(draw.top_n[0]) == best.indices.tolist()
    assert list(draw.top_n[0].values()) == pytest.approx(best.values.tolist())
    assert draw.top_n[1] is None
    assert draw.log_probs[1] == pytest.approx(float(lp[1, draw.tokens[1]]))


def test_greedy_plain_batches_stay_one_argmax():
    logits = _logits(3, 100)
    tokens, _ = sample(logits, [SamplingState(top_k=1) for _ in range(3)], [False] * 3)
    assert tokens == logits.argmax(-1).tolist()


# ------------------------------------------------------------------ validation and broadcast


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", 2**63),
        ("top_k", 2**64),
        ("num_tokens_to_generate", -1),
        ("num_tokens_total", 2**70),
        ("min_tokens", -3),
        ("top_n_logprobs", 21),
        ("seed", 2**64),
        ("termination_id", -(2**63) - 1),
        ("min_p", 1.5),
        ("presence_penalty", 2.5),
        ("frequency_penalty", math.inf),
        ("repetition_penalty", 0.0),
        ("temperature", math.nan),
        ("stop_token_ids", [1, -2]),
        ("stop_token_ids", list(range(1025))),
        ("stop_token_ids", [2**63]),
        ("logit_bias", {5: 100.5}),
        ("logit_bias", {"x": 1.0}),
        ("logit_bias", {2**64: 1.0}),
        ("ignore_eos", 1),
        ("skip_special_tokens", "no"),
    ],
)
def test_out_of_bounds_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ProtocolError) as info:
        validate_sampling_params({field: value})
    assert info.value.code.value == "invalid_request"
    assert field in str(info.value)


def test_logit_bias_keys_from_json_become_token_ids():
    clean = validate_sampling_params({"logit_bias": {"50256": -100, 7: 2}})
    assert clean["logit_bias"] == {50256: -100.0, 7: 2.0}


def test_every_new_field_survives_the_tp_broadcast():
    params = SamplingParams(
        temperature=0.7,
        top_k=40,
        ignore_eos=True,
        min_tokens=5,
        stop_token_ids=[3, 50256],
        min_p=0.05,
        presence_penalty=-0.5,
        frequency_penalty=1.25,
        repetition_penalty=1.1,
        logit_bias={11: -100.0, 12: 0.5},
        top_n_logprobs=5,
        return_prompt_top_n_logprobs=True,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
    )
    plain = SamplingParams(top_k=1)
    inputs = StepInputs([], [NewRequest(1, [1, 2], params, 9), NewRequest(2, [3], plain, 4)])
    out = unpack(pack(inputs))
    got, got_plain = out.requests[0].params, out.requests[1].params
    for name in SamplingParams.__dataclass_fields__:
        if name not in ("stop_words", "add_BOS", "return_segments", "seed"):
            assert getattr(got, name) == getattr(params, name), name
            assert getattr(got_plain, name) == getattr(plain, name), name
    # A request without the new fields packs as many words as before them.
    assert len(pack(StepInputs([], [NewRequest(2, [3], plain, 4)]))) == 1 + 1 + 3 + 1 + 11


def test_the_candidate_shortcuts_draw_what_the_whole_vocabulary_does():
    """A peaked row alone (noise for its few contenders only) and beside a flat row (noise for
    the whole vocabulary): the same tokens, draw after draw."""
    peaked = _logits(1, 5000, seed=3) * 12
    flat = _logits(1, 5000, seed=4) * 0.1
    for params in ({"temperature": 1.0}, {"top_p": 0.9}, {"min_p": 0.2}, {"top_k": 30}):
        alone = SamplingState(seed=8, **params)
        crowded = [SamplingState(seed=8, **params), SamplingState(temperature=1.0, seed=2)]
        sampler, sampler2 = Sampler(1, 5000), Sampler(2, 5000)
        both = torch.cat([peaked, flat])
        for _ in range(25):
            mine = sampler(peaked, [alone], [False]).tokens[0]
            assert mine == sampler2(both, crowded, [False, False]).tokens[0], params
