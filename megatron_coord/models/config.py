"""The model's configuration and how its dimensions split over tensor-parallel ranks.

``ModelConfig`` is the subset of a Hugging Face ``LlamaConfig`` the model implements, parsed from
a checkpoint's ``config.json``; ``TPLayout`` is one rank's share of heads, MLP width and
vocabulary. Both are plain data, so the checkpoint loader can use them without the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    """The subset of a Hugging Face ``LlamaConfig`` this model implements."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict, refusing features this model does not implement.

        Accepts both transformers 4 (``rope_theta``/``rope_scaling``) and 5
        (``rope_parameters``) spellings of the RoPE settings.
        """
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"unsupported model_type {model_type!r}: only 'llama' is supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: Llama's SwiGLU needs 'silu'")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key, False):
                raise ValueError(f"unsupported {key}=True: this Llama has no biases")
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in d
        ]
        if missing:
            raise ValueError(f"config.json lacks required keys: {missing}")
        heads = int(d["num_attention_heads"])
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // heads
        config = cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Check sizes are positive and heads group evenly (GQA needs heads % kv_heads == 0)."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")


def _rope_theta(d: dict[str, Any]) -> float:
    """Read rope_theta; only plain RoPE (no scaling) is implemented, so refuse the others."""
    scaling = d.get("rope_scaling")
    if scaling is not None and (
        not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "default"
    ):
        raise ValueError(f"unsupported rope_scaling {scaling!r}: only None is supported")
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"rope_parameters must be a dict, got {params!r}")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE type {rope_type!r}: only 'default' is supported")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(d.get("rope_theta", 10000.0))


@dataclass(frozen=True)
class TPLayout:
    """How the model's dimensions split over ``tp`` ranks; raises if they do not divide."""

    tp: int
    rank: int
    heads: int  # local attention heads
    kv_heads: int  # local KV heads
    intermediate: int  # local MLP width
    vocab_padded: int  # whole vocabulary, padded to a multiple of tp
    vocab_part: int  # local vocabulary rows

    @classmethod
    def of(cls, config: ModelConfig, tp: int, rank: int) -> TPLayout:
        for name, value in (
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.num_key_value_heads),
            ("intermediate_size", config.intermediate_size),
        ):
            if value % tp != 0:
                raise ValueError(
                    f"{name} ({value}) is not divisible by the tensor-parallel size ({tp})"
                )
        vocab_padded = math.ceil(config.vocab_size / tp) * tp
        return cls(
            tp=tp,
            rank=rank,
            heads=config.num_attention_heads // tp,
            kv_heads=config.num_key_value_heads // tp,
            intermediate=config.intermediate_size // tp,
            vocab_padded=vocab_padded,
            vocab_part=vocab_padded // tp,
        )

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_part
