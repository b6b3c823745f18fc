"""The TP Llama's weights as whole Hugging Face tensors: the shard plan read backwards.

A trainer that sends its weights to replicas elsewhere (``WeightSender``, megatron_coord.weights)
sends whole tensors under Hugging Face names, which each receiving rank cuts to its own shard
(shard_plan.py). ``hf_tensors`` rebuilds them from a rank's local parameters: at TP 1 they are
views of the parameters (Q/K/V and gate/up are row ranges of the fused matrices), no copy;
at TP > 1 each rank writes its part into a zeroed whole tensor and the TP group sums them
(collective: every rank of the group calls it), replicated tensors (the norms) taken as
they are. ``to_hf_model`` loads them into a transformers ``LlamaForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import torch

from .llama import LlamaModel
from .shard_plan import shard_plan


def hf_tensors(model: LlamaModel) -> list[tuple[str, torch.Tensor]]:
    """(Hugging Face name, whole tensor) of every weight, in a fixed order (the same on every
    rank). Collective over the model's TP group at TP > 1."""
    params = dict(model.named_parameters())
    tied = "lm_head" not in params
    plan = shard_plan(model.config, model.layout, tied)
    split = model.layout.tp > 1
    whole: dict[str, torch.Tensor] = {}
    summed: list[torch.Tensor] = []
    with torch.no_grad():
        for local_name, parts in plan.items():
            param = params[local_name].detach()  # lm_head: a [vocab part, hidden] view
            for part in parts:
                if part.dim is None:
                    whole[part.name] = param
                    continue
                if not split:
                    if part.dim == 0:
                        whole[part.name] = param[part.row : part.row + part.hi - part.lo]
                    else:
                        whole[part.name] = param
                    continue
                target = whole.get(part.name)
                if target is None:
                    target = torch.zeros(part.shape, dtype=param.dtype, device=param.device)
                    whole[part.name] = target
                    summed.append(target)
                if part.dim == 0:
                    target[part.lo : part.hi] = param[part.row : part.row + part.hi - part.lo]
                else:
                    target[:, part.lo : part.hi] = param
        for target in summed:
            model.tp.all_reduce(target)  # in place: no tensor here requires grad
    return sorted(whole.items())


def to_hf_model(model: LlamaModel, hf_model: Any) -> Any:
    """Copy ``model``'s weights into ``hf_model`` (a ``LlamaForCausalLM`` of the same
    architecture, e.g. ``from_pretrained`` of the checkpoint ``model`` was loaded from) and
    return it: transformers then runs the weights our model has now (the RL rollout benchmark
    times its ``generate`` on the weights our engine serves). Every Hugging Face weight must be
    covered (the output layer by the embedding when tied). Collective at TP > 1, as
    ``hf_tensors``."""
    missing, unexpected = hf_model.load_state_dict(dict(hf_tensors(model)), strict=False)
    tied = getattr(hf_model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"architecture mismatch: missing {missing}, unexpected {unexpected}")
    if tied:
        hf_model.tie_weights()
    return hf_model
