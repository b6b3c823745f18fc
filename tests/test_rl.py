"""GRPO's learning core (rl/grpo.py), the toy task (rl/toy_task.py) and a learning smoke test
of the in-process loop (rl/prototype.py) on a tiny model: hand-computed advantages and losses,
the rollout layout, the reward, and a reward that rises within a few steps."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_coord.models import training
from megatron_coord.models.checkpoint import load_model
from megatron_coord.parallel_state import single_process_state
from megatron_coord.rl.grpo import (
    GRPOConfig,
    Rollout,
    RolloutBatch,
    group_advantages,
    pack_rollouts,
    policy_loss,
    policy_step,
)
from megatron_coord.rl.prototype import PrototypeConfig, run
from megatron_coord.rl.toy_task import NumeralsTask
from megatron_coord.tokenizer import load_tokenizer


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.3])
    groups = torch.tensor([0, 1, 0, 1, 0, 0, 2])  # groups interleaved; group 2 alone
    # group 0: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    expected = torch.tensor([1.5, 0.0, -0.5, 0.0, -0.5, -0.5, 0.0])
    got = group_advantages(rewards, groups, eps=0.0)
    torch.testing.assert_close(got, expected)
    unscaled = torch.tensor([0.75, 0.0, -0.25, 0.0, -0.25, -0.25, 0.0])
    torch.testing.assert_close(group_advantages(rewards, groups, scale_by_std=False), unscaled)
    assert group_advantages(rewards, groups).dtype == torch.float32


def _batch(advantages, mask, old=None, ref=None) -> RolloutBatch:
    mask = torch.tensor(mask)
    old = torch.zeros(mask.shape) if old is None else old
    return RolloutBatch(
        torch.zeros(len(mask), 3, dtype=torch.long), 1, mask, old, torch.tensor(advantages), ref
    )


def test_clipped_loss_by_hand():
    # ratios 1.5 and 0.5 against the sampler's log-prob 0; clip range [0.8, 1.2]
    new = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]])).requires_grad_()
    batch = _batch([1.0, -1.0], [[True, True], [True, True]])
    loss, stats = policy_loss(new, batch, GRPOConfig(), total_tokens=4, total_rows=2)
    # A=+1: -min(1.5, 1.2) - min(0.5, 0.8) = -1.7; A=-1: -min(-1.5, -1.2) - min(-0.5, -0.8) = 2.3
    assert loss.item() == pytest.approx((-1.7 + 2.3) / 4)
    assert stats["clipped"].item() == 4 and stats["ratio"].item() == pytest.approx(4.0)
    loss.backward()
    # The gradient flows only where the unclipped term is the minimum: d(-r A)/d log r = -r A.
    expected = torch.tensor([[0.0, -0.5], [1.5, 0.0]]) / 4
    torch.testing.assert_close(new.grad, expected)


def test_sequence_aggregation_and_mask_by_hand():
    new = torch.zeros(2, 3)  # ratio 1: per token loss = -A
    batch = _batch([2.0, 1.0], [[True, False, False], [True, True, True]])
    config = GRPOConfig(aggregation="sequence")
    loss, _ = policy_loss(new, batch, config, total_tokens=4, total_rows=2)
    assert loss.item() == pytest.approx((-2.0 + -1.0) / 2)
    loss, _ = policy_loss(new, batch, GRPOConfig(), total_tokens=4, total_rows=2)
    assert loss.item() == pytest.approx((-2.0 - 3 * 1.0) / 4)


def test_kl_term_by_hand():
    new = torch.log(torch.tensor([[1.5]]))
    batch = _batch([0.0], [[True]], ref=torch.zeros(1, 1))
    loss, stats = policy_loss(new, batch, GRPOConfig(kl_coef=0.5), total_tokens=1, total_rows=1)
    kl = 2 / 3 + math.log(1.5) - 1  # k3: exp(ref - new) - (ref - new) - 1
    assert stats["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.5 * kl)
    with pytest.raises(ValueError, match="ref_log_probs"):
        policy_loss(new, _batch([0.0], [[True]]), GRPOConfig(kl_coef=0.5), 1, 1)


def test_pack_rollouts_lays_out_prompts_completions_and_padding():
    rollouts = [
        Rollout([5, 6, 7], [8, 9], [-1.0, -2.0], 1.0, 0),
        Rollout([5, 6], [4], [-3.0], 0.0, 0),
    ]
    batch = pack_rollouts(rollouts, torch.tensor([1.0, -1.0]), pad_id=0)
    assert batch.first == 2
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9], [5, 6, 4, 0, 0]]
    # columns stand for positions 2, 3, 4: row 0 generated 3 and 4, row 1 generated 2
    assert batch.mask.tolist() == [[False, True, True], [True, False, False]]
    assert batch.old_log_probs.tolist() == [[0.0, -1.0, -2.0], [-3.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="log-prob per generated token"):
        pack_rollouts([Rollout([1], [2, 3], [-1.0], 0.0, 0)], torch.zeros(1))


def test_rollout_from_record_needs_log_probs():
    record = {
        "requests": [{"prompt_tokens": [1], "generated_tokens": [2], "generated_log_probs": [-0.5]}]
    }
    assert Rollout.from_record(record, 0.5, 3) == Rollout([1], [2], [-0.5], 0.5, 3)
    record["requests"][0]["generated_log_probs"] = None
    with pytest.raises(ValueError, match="return_log_probs"):
        Rollout.from_record(record, 0.5, 3)


def test_numerals_reward(tokenizer):
    task = NumeralsTask(tokenizer, 50257)
    ids = {text: tokenizer.tokenize(text) for text in (" 42", "7", "1999", " cat", "x", "\n")}
    assert all(len(t) == 1 for t in ids.values()), ids
    numeral, other = ids[" 42"] + ids["7"] + ids["1999"], ids[" cat"] + ids["x"] + ids["\n"]
    assert task.reward(numeral) == 1.0 and task.reward(other) == 0.0
    assert task.reward(numeral[:1] + other) == 0.25 and task.reward([]) == 0.0
    # The untrained default model samples nearly uniformly: it scores about this fraction.
    assert 0.02 < len(task.numeral_ids) / 50257 < 0.05
    assert all(task.prompt_tokens) and len(task.sample_prompts(20, random.Random(0))) == 20


@pytest.fixture(scope="module")
def flat_checkpoint(tmp_path_factory):
    """A tiny Llama with a near-uniform next-token distribution, like the default model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_coord.tokenizer import gpt2_tokenizer

    path = str(tmp_path_factory.mktemp("flat"))
    config = LlamaConfig(
        vocab_size=50257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    gpt2_tokenizer().hf_tokenizer.save_pretrained(path)
    return path


def test_policy_step_raises_the_advantaged_completion(flat_checkpoint):
    model = load_model(flat_checkpoint, single_process_state())
    params = training.set_trainable(model, "all")
    rollouts = [
        Rollout([1, 2], [3, 4], [0.0, 0.0], 1.0, 0),
        Rollout([1, 2], [5, 6], [0.0, 0.0], 0.0, 0),
    ]
    with torch.no_grad():
        for r in rollouts:
            r.log_probs = training.token_log_probs(
                model, torch.tensor([r.prompt_tokens + r.generated_tokens]), 2
            )[0].tolist()
    batch = pack_rollouts(rollouts, group_advantages(torch.tensor([1.0, 0.0]), torch.zeros(2)))
    before = training.token_log_probs(model, batch.tokens, 2).detach()
    optimizer = torch.optim.Adam(params, lr=1e-2)
    stats = policy_step(model, optimizer, params, batch, GRPOConfig())
    after = training.token_log_probs(model, batch.tokens, 2).detach()
    assert stats["mismatch"] < 1e-5 and stats["mean_ratio"] == pytest.approx(1.0)
    assert (after[0] > before[0]).all() and (after[1] < before[1]).all()


def test_the_loop_learns_within_seconds(flat_checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the loop is meant to run; several threads only contend here
    try:
        model = load_model(flat_checkpoint, single_process_state())
        config = PrototypeConfig(
            steps=10, prompts_per_step=4, group_size=8, max_new_tokens=8, lr=0.1
        )
        log = run(config, model, load_tokenizer(flat_checkpoint))
    finally:
        torch.set_num_threads(threads)
    rewards = [entry["mean_reward"] for entry in log]
    print("REWARDS", rewards)
    assert rewards[0] < 0.1, rewards
    assert max(rewards[-3:]) > 0.5, rewards
    assert all(entry["mismatch"] < 1e-4 for entry in log)
