"""TP=1 model tests: parity with transformers' LlamaForCausalLM (fp32, 1e-4) through prefill,
chunked prefill and KV-cache decode at different per-row positions; argument validation."""

from __future__ import annotations

import pytest
import torch
from _model_scenario import (
    SMALL,
    max_error,
    reference_logits,
    run_scenario,
    save_hf_checkpoint,
    scenario_tokens,
)

from megatron_coord.models.checkpoint import load_model
from megatron_coord.models.config import ModelConfig, TPLayout
from megatron_coord.models.llama import LlamaModel
from megatron_coord.parallel_state import ParallelState, single_process_state

TOL = 1e-4


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tied"))
    return path, save_hf_checkpoint(path, seed=1, tie=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("untied"))
    return path, save_hf_checkpoint(path, seed=2, tie=False, max_shard_size="40KB")


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_tp1_matches_transformers(which, request):
    path, hf_model = request.getfixturevalue(which)
    tokens = scenario_tokens()
    ref = reference_logits(hf_model, tokens)
    # The reference is far from constant, so 1e-4 agreement means something.
    assert ref.std() > 0.1 and (ref[:, 1:] - ref[:, :-1]).abs().max() > 0.5
    model = load_model(path, single_process_state())
    for case, result in run_scenario(model, tokens).items():
        assert result[0].dtype == torch.float32
        assert max_error(result, ref) < TOL, case


def test_tied_model_shares_one_output_matrix(tied):
    model = load_model(tied[0], single_process_state())
    assert model.lm_head is model.embed_tokens


def test_last_position_logits_shape(tied):
    model = load_model(tied[0], single_process_state())
    cache = model.allocate_kv_cache(2, 16)
    tokens = scenario_tokens()[:2, :7]
    last = model(tokens, torch.zeros(2, dtype=torch.long), torch.tensor([1, 0]), cache)
    full = model(tokens, torch.zeros(2, dtype=torch.long), torch.tensor([1, 0]), cache, True)
    assert last.shape == (2, SMALL["vocab_size"])
    assert full.shape == (2, 7, SMALL["vocab_size"])
    # Same numbers up to matmul blocking (last-only skips the other positions' output layer).
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=0)


def test_bfloat16_runs_and_stays_close(tied):
    path, hf_model = tied
    tokens = scenario_tokens()
    ref = reference_logits(hf_model, tokens)
    model = load_model(path, single_process_state(), dtype=torch.bfloat16)
    assert model.embed_tokens.dtype == torch.bfloat16
    cache = model.allocate_kv_cache(4, 32)
    logits = model(tokens, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]), cache, True)
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max() < 0.25  # bf16 rounding, not a wrong model
    assert (logits - ref).abs().max() > 0  # and it really ran in bf16


def _bad_call(model, cache, **override):
    args = {
        "tokens": torch.zeros(2, 3, dtype=torch.long),
        "start_positions": torch.zeros(2, dtype=torch.long),
        "slots": torch.tensor([0, 1]),
    }
    args.update(override)
    return model(args["tokens"], args["start_positions"], args["slots"], cache)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"tokens": torch.zeros(3, dtype=torch.long)}, "non-empty"),
        ({"tokens": torch.zeros(2, 0, dtype=torch.long)}, "non-empty"),
        ({"start_positions": torch.zeros(3, dtype=torch.long)}, "shape"),
        ({"slots": torch.tensor([0, 2])}, "slots must lie"),
        ({"slots": torch.tensor([-1, 0])}, "slots must lie"),
        ({"slots": torch.tensor([1, 1])}, "distinct"),
        ({"start_positions": torch.tensor([0, 6])}, "max_seq_len"),
        ({"start_positions": torch.tensor([-1, 0])}, "max_seq_len"),
        ({"tokens": torch.full((2, 3), SMALL["vocab_size"])}, "token ids"),
        ({"tokens": torch.full((2, 3), -1)}, "token ids"),
        ({"tokens": torch.zeros(2, 3)}, "integer"),
    ],
)
def test_forward_rejects_bad_arguments(tied, override, message):
    model = load_model(tied[0], single_process_state())
    cache = model.allocate_kv_cache(2, 8)
    with pytest.raises((ValueError, TypeError), match=message):
        _bad_call(model, cache, **override)
    # A good call still works afterwards, and the cache stays usable.
    assert _bad_call(model, cache).shape == (2, SMALL["vocab_size"])


def test_rejects_cache_of_another_model(tied):
    model = load_model(tied[0], single_process_state())
    other = ModelConfig.from_hf_dict({**SMALL, "num_hidden_layers": 3})
    cache = LlamaModel(other, single_process_state()).allocate_kv_cache(2, 8)
    with pytest.raises(ValueError, match="kv_cache"):
        _bad_call(model, cache)


def _tp_state(tp: int, tp_rank: int) -> ParallelState:
    return ParallelState(tp_rank, tp, tp, tp_rank, 0, 1, None, 0, "gloo", torch.device("cpu"))


def test_tp_layout_pads_vocab_and_splits_heads():
    config = ModelConfig.from_hf_dict(SMALL)
    lay = TPLayout.of(config, 2, 1)
    assert (lay.vocab_padded, lay.vocab_part, lay.vocab_start) == (102, 51, 51)
    assert (lay.heads, lay.kv_heads, lay.intermediate) == (2, 1, 48)
    model = LlamaModel(config, _tp_state(2, 1))
    assert model.layers[0].self_attn.qkv_proj.shape == ((2 + 2 * 1) * 24, 64)
    assert model.layers[0].self_attn.o_proj.shape == (64, 2 * 24)
    assert model.layers[0].mlp.gate_up_proj.shape == (96, 64)
    assert model.layers[0].mlp.down_proj.shape == (64, 48)


@pytest.mark.parametrize(
    "changes, tp, message",
    [
        ({}, 4, "num_key_value_heads \\(2\\) is not divisible"),
        ({"num_key_value_heads": 4}, 3, "num_attention_heads \\(4\\) is not divisible"),
        ({"intermediate_size": 97}, 2, "intermediate_size \\(97\\) is not divisible"),
    ],
)
def test_tp_sizes_that_do_not_divide_are_refused(changes, tp, message):
    config = ModelConfig.from_hf_dict({**SMALL, **changes})
    with pytest.raises(ValueError, match=message):
        LlamaModel(config, _tp_state(tp, 0))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "RoPE type"),
        ({"rope_scaling": "yarn"}, "rope_scaling"),
        ({"rope_parameters": 3.0}, "rope_parameters"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "mistral"}, "model_type"),
        ({"num_key_value_heads": 3}, "multiple of"),
        ({"head_dim": 7}, "even"),
    ],
)
def test_config_refuses_unsupported_features(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**SMALL, **changes})


def test_config_reads_both_rope_spellings():
    v4 = {k: v for k, v in SMALL.items() if k != "rope_parameters"}
    assert (
        ModelConfig.from_hf_dict({**v4, "rope_theta": 123.0, "rope_scaling": None}).rope_theta
        == 123.0
    )
    assert ModelConfig.from_hf_dict(SMALL).rope_theta == 500.0
    assert ModelConfig.from_hf_dict(v4).rope_theta == 10000.0
