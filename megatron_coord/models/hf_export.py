"""Our TP=1 Llama's weights as a Hugging Face ``LlamaForCausalLM`` state dict.

The inverse of the checkpoint loader, read off the same ``shard_plan``: each local parameter
is cut back into the Hugging Face tensors it was filled from (``qkv_proj`` into q/k/v,
``gate_up_proj`` into gate/up, the vocabulary's padding rows dropped). It lets a trained model
be compared with, or run by, transformers at the weights it has now (the RL rollout benchmark
times transformers' ``generate`` on the weights our engine serves). The tensors are copies:
the model may go on training.
"""

from __future__ import annotations

from typing import Any

import torch

from .llama import LlamaModel
from .shard_plan import shard_plan


def hf_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Hugging Face tensor name -> a contiguous copy of it, for a TP=1 model.

    With tied embeddings (one parameter) only ``model.embed_tokens.weight`` is listed, as a
    tied checkpoint holds it."""
    if model.layout.tp != 1:
        raise ValueError(f"hf_state_dict needs a TP=1 model, this one is TP={model.layout.tp}")
    params = dict(model.named_parameters())
    tied = "lm_head" not in params
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, parts in shard_plan(model.config, model.layout, tied).items():
            param = params[name]
            for part in parts:
                rows = part.hi - part.lo
                piece = param[part.row : part.row + rows] if part.dim == 0 else param
                if tuple(piece.shape) != part.shape:
                    raise RuntimeError(f"{part.name}: {tuple(piece.shape)} != {part.shape}")
                out[part.name] = piece.detach().contiguous().clone()
    return out


def to_hf_model(model: LlamaModel, hf_model: Any) -> Any:
    """Copy ``model``'s weights into ``hf_model`` (a ``LlamaForCausalLM`` of the same
    architecture, e.g. ``from_pretrained`` of the checkpoint ``model`` was loaded from) and
    return it. Every Hugging Face weight must be covered (the output layer by the embedding
    when tied)."""
    state = hf_state_dict(model)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    tied = getattr(hf_model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"architecture mismatch: missing {missing}, unexpected {unexpected}")
    if tied:
        hf_model.tie_weights()
    return hf_model
