"""models/hf_export.py ``to_hf_model``: our TP=1 model's weights, after an optimizer step, run
by transformers give our logits (tied and untied output layers)."""

from __future__ import annotations

import pytest
import torch
from _model_scenario import save_hf_checkpoint, scenario_tokens

from megatron_coord.models import training
from megatron_coord.models.checkpoint import load_model
from megatron_coord.models.hf_export import hf_tensors, to_hf_model
from megatron_coord.parallel_state import single_process_state


@pytest.mark.parametrize("tie", [True, False])
def test_trained_weights_run_by_transformers_give_our_logits(tmp_path, tie):
    from transformers import LlamaForCausalLM

    save_hf_checkpoint(str(tmp_path), seed=3, tie=tie)
    ours = load_model(str(tmp_path), single_process_state())
    tokens = scenario_tokens()
    params = training.set_trainable(ours, "all")
    optimizer = torch.optim.Adam(params, lr=1e-2)
    training.train_logits(ours, tokens).logsumexp(-1).mean().backward()
    optimizer.step()  # the weights differ from the checkpoint's now
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    before = hf(tokens).logits
    to_hf_model(ours, hf)
    with torch.no_grad():
        expected = training.train_logits(ours, tokens)
        got = hf(tokens).logits
    assert (before - expected).abs().max() > 1e-3  # the step moved the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    names = {name for name, _ in hf_tensors(ours)}
    assert ("lm_head.weight" in names) is not tie and "model.embed_tokens.weight" in names
