"""Training the TP Llama (models/training.py): loss and gradients equal transformers' at TP 1
and TP 1's at TP 2 (a real torchrun gloo world, which also checks that two data-parallel
replicas of a GRPO step take the whole batch's step); the training forward's log-probs equal
the serving forward's; right padding does not change a row's log-probs; serving is untouched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _model_scenario import SMALL, save_hf_checkpoint, scenario_tokens
from _model_training_worker import grpo_step, loss_weights, training_grads

from megatron_coord.models import training
from megatron_coord.models.checkpoint import load_model
from megatron_coord.models.config import ModelConfig, TPLayout
from megatron_coord.parallel_state import single_process_state

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "tied": (str(root / "tied"), save_hf_checkpoint(str(root / "tied"), seed=1, tie=True)),
        "untied": (
            str(root / "untied"),
            save_hf_checkpoint(str(root / "untied"), seed=2, tie=False),
        ),
    }


def hf_grads(hf_model, tied: bool) -> dict[str, torch.Tensor]:
    """transformers' gradients under our parameter names (Q/K/V and gate/up fused)."""
    g = {n: p.grad for n, p in hf_model.named_parameters()}
    ours = {"embed_tokens": g["model.embed_tokens.weight"], "norm.weight": g["model.norm.weight"]}
    if not tied:
        ours["lm_head"] = g["lm_head.weight"]
    for i in range(SMALL["num_hidden_layers"]):
        a, m, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"layers.{i}."
        qkv = [g[a + x + "_proj.weight"] for x in "qkv"]
        ours[p + "self_attn.qkv_proj"] = torch.cat(qkv)
        ours[p + "self_attn.o_proj"] = g[a + "o_proj.weight"]
        ours[p + "mlp.gate_up_proj"] = torch.cat(
            [g[m + "gate_proj.weight"], g[m + "up_proj.weight"]]
        )
        ours[p + "mlp.down_proj"] = g[m + "down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            ours[p + norm + ".weight"] = g[f"model.layers.{i}.{norm}.weight"]
    return ours


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_tp1_loss_and_grads_match_transformers(which, checkpoints):
    path, hf_model = checkpoints[which]
    tokens = scenario_tokens()
    hf_model.zero_grad()
    logits = hf_model(tokens).logits.float()
    hf_lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    hf_loss = (hf_lp * loss_weights(tokens)).sum()
    hf_loss.backward()
    ours = training_grads(load_model(path, single_process_state()), tokens)
    assert abs(ours["loss"] - hf_loss.item()) < 1e-4 * max(1.0, abs(hf_loss.item()))
    expected = hf_grads(hf_model, which == "tied")
    assert set(expected) == set(ours["grads"]["log_probs"])
    for name, grad in ours["grads"]["log_probs"].items():
        assert grad.abs().max() > 0, name  # every weight really gets a gradient
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_train_log_probs_equal_serving_log_probs(checkpoints):
    model = load_model(checkpoints["tied"][0], single_process_state())
    tokens = scenario_tokens()
    cache = model.allocate_kv_cache(4, 32)
    b = tokens.shape[0]
    logits = model(tokens, torch.zeros(b, dtype=torch.long), torch.arange(b), cache, True)
    serving = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    training.set_trainable(model, "all")
    trained = training.token_log_probs(model, tokens)
    assert trained.requires_grad and trained.shape == serving.shape
    assert (trained.detach() - serving).abs().max() < 1e-5
    tail = training.token_log_probs(model, tokens, first=6)  # output layer on the tail only
    torch.testing.assert_close(tail, trained[:, 5:], atol=1e-5, rtol=0)
    mask = torch.rand(tail.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    masked = training.token_log_probs(model, tokens, 6, mask)
    torch.testing.assert_close(masked, tail.where(mask, 0.0), atol=1e-5, rtol=0)
    (from_masked,) = torch.autograd.grad(masked.sum(), [model.lm_head], retain_graph=True)
    (from_tail,) = torch.autograd.grad(tail[mask].sum(), [model.lm_head])
    torch.testing.assert_close(from_masked, from_tail, atol=1e-6, rtol=1e-5)
    with torch.inference_mode():  # the serving path, after set_trainable, gives the same
        again = model(tokens, torch.zeros(b, dtype=torch.long), torch.arange(b), cache, True)
    assert torch.equal(again, logits)


def test_right_padding_leaves_real_tokens_alone(checkpoints):
    model = load_model(checkpoints["untied"][0], single_process_state())
    tokens = scenario_tokens()
    short = tokens[1:2, :9]
    padded = tokens.clone()
    padded[1, 9:] = 0  # row 1 is 9 real tokens, then padding
    alone = training.token_log_probs(model, short)
    batched = training.token_log_probs(model, padded)
    torch.testing.assert_close(batched[1, :8], alone[0], atol=1e-5, rtol=0)


def test_set_trainable_output_only_trains_the_output_layer(checkpoints):
    model = load_model(checkpoints["tied"][0], single_process_state())
    params = training.set_trainable(model, "output")
    assert params == [model.lm_head] and model.lm_head is model.embed_tokens
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["embed_tokens"]
    training.token_log_probs(model, scenario_tokens()).sum().backward()
    assert model.lm_head.grad.abs().max() > 0
    assert len(training.set_trainable(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="which must be one of"):
        training.set_trainable(model, "embedding")


def test_clip_grad_norm_scales_to_the_bound(checkpoints):
    model = load_model(checkpoints["untied"][0], single_process_state())
    params = training.set_trainable(model, "all")
    training.token_log_probs(model, scenario_tokens()).sum().backward()
    norm = training.grad_norm(model, params)
    torch.testing.assert_close(norm, torch.nn.utils.get_total_norm([p.grad for p in params]))
    before = training.clip_grad_norm(model, params, max_norm=0.5 * norm.item())
    torch.testing.assert_close(before, norm)
    torch.testing.assert_close(training.grad_norm(model, params), 0.5 * norm, rtol=1e-4, atol=0)


def test_bad_arguments_are_refused(checkpoints):
    model = load_model(checkpoints["tied"][0], single_process_state())
    with pytest.raises(ValueError, match="first must lie"):
        training.token_log_probs(model, scenario_tokens(), first=16)
    with pytest.raises(ValueError, match="non-empty"):
        training.causal_hidden(model, torch.zeros(3, dtype=torch.long))


def tp_shard(name: str, full: torch.Tensor, lay: TPLayout, config: ModelConfig) -> torch.Tensor:
    """This rank's shard of a TP=1 gradient, laid out as at load (checkpoint.py)."""
    if full.dim() == 1:
        return full  # norm weights: replicated
    hd = config.head_dim
    if name in ("embed_tokens", "lm_head"):
        padded = torch.zeros(lay.vocab_padded, full.shape[1])
        padded[: full.shape[0]] = full
        return padded[lay.vocab_start : lay.vocab_start + lay.vocab_part]
    if name.endswith("qkv_proj"):
        nq, nk = config.num_attention_heads * hd, config.num_key_value_heads * hd
        q, k, v = full.split([nq, nk, nk])
        lq, lk = lay.heads * hd, lay.kv_heads * hd
        r = lay.rank
        return torch.cat(
            [q[r * lq : (r + 1) * lq], k[r * lk : (r + 1) * lk], v[r * lk : (r + 1) * lk]]
        )
    if name.endswith("gate_up_proj"):
        gate, up = full.chunk(2)
        f = lay.intermediate
        return torch.cat(
            [gate[lay.rank * f : (lay.rank + 1) * f], up[lay.rank * f : (lay.rank + 1) * f]]
        )
    width = full.shape[1] // lay.tp  # o_proj, down_proj: column shards
    return full[:, lay.rank * width : (lay.rank + 1) * width]


@pytest.mark.torchrun
def test_tp2_grads_equal_tp1_grads(checkpoints, tmp_path):
    tokens = scenario_tokens()
    torch.save(tokens, tmp_path / "tokens.pt")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.join(HERE, "_model_training_worker.py"),
        str(out),
        str(tmp_path / "tokens.pt"),
        *(path for path, _ in checkpoints.values()),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for which, (path, _) in checkpoints.items():
        model = load_model(path, single_process_state())
        reference = training_grads(model, tokens)
        config = model.config
        for rank in range(2):
            got = torch.load(out / f"{os.path.basename(path)}.rank{rank}.pt")
            lay = TPLayout.of(config, 2, rank)
            for key in ("log_probs", "tail_log_probs", "masked_log_probs"):
                torch.testing.assert_close(got[key], reference[key], atol=1e-5, rtol=0)
            for key in ("loss", "logits_loss", "grad_norm"):
                assert got[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-5), key
            for loss in ("log_probs", "logits"):
                for name, full in reference["grads"][loss].items():
                    expected = tp_shard(name, full, lay, config)
                    torch.testing.assert_close(
                        got["grads"][loss][name],
                        expected,
                        atol=1e-5,
                        rtol=1e-4,
                        msg=f"{which}/{loss}/{name} rank {rank}",
                    )
    # Two data-parallel replicas, half the rollouts each, take the step of the whole batch.
    initial = load_model(checkpoints["tied"][0], single_process_state()).state_dict()
    whole = grpo_step(load_model(checkpoints["tied"][0], single_process_state()), slice(0, 4))
    assert all(not torch.equal(whole[name], initial[name]) for name in whole)  # a real step
    for rank in range(2):
        got = torch.load(out / f"dp.rank{rank}.pt")
        for name, expected in whole.items():
            torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=1e-5, msg=name)
