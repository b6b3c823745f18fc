"""The GRPO loop's hyperparameters and model, shared by both loops and their command lines.

One dataclass for the in-process prototype (rl/prototype.py) and the loop through the
coordinator (rl/loop.py, run by launch/train_grpo.py): the defaults were tuned in one and must
mean the same in the other, so neither keeps a copy. ``add_arguments`` / ``from_arguments``
turn its fields into command-line flags for both.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ..models import training
from ..parallel_state import ParallelState
from ..sampling_params import SamplingParams
from .grpo import GRPOConfig

_INT_FIELDS = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "seed")
_FLOAT_FIELDS = ("temperature", "lr")


@dataclass
class LoopConfig:
    """The loop's hyperparameters; the defaults are tuned for the default model on the toy task.

    Measured on 2 shared CPU cores, one torch thread, seeds 0-4: the mean reward goes from
    about 0.03 to at least 0.8 after 6 to 8 policy steps (about 3 s each: 0.9 s of rollouts,
    2 s of training, nearly all of it the output layer's 50257 columns) and stays at 1.0 once
    there (the policy settles on one numeral); ``steps`` leaves more than twice that margin:
    60-75 s for the 20 steps. All weights train: the output layer alone (tied to the
    embedding) is slower and less steady (at 1e-2 it reaches 0.23 in 15 steps where all
    weights reach 1.0 in 10; at 3e-2 it wavers between 0.8 and 0.9), since without the
    layers below it cannot make the last hidden state alike across contexts. Adam at 2e-2
    is high for a real model and right for this random one, whose logits must move by about
    5 nats; 1e-2 takes about twice the steps, 3e-3 does not move in 15. Eight prompts of
    eight rollouts (64 sequences) make one batch and one optimizer step: four prompts take
    cheaper but noisier steps, more of them, for about the same wall time. Through the
    coordinator (rl/loop.py) the prompts of a step are split over the data-parallel ranks,
    so the batch, and the step, stay the same at any DP size.
    """

    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    lr: float = 2e-2
    trainable: str = "all"
    seed: int = 0
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def sampling_params(self) -> SamplingParams:
        """Temperature sampling with the sampler's log-probs (GRPO's ratio needs them)."""
        return SamplingParams(
            temperature=self.temperature,
            num_tokens_to_generate=self.max_new_tokens,
            return_log_probs=True,
            skip_prompt_log_probs=True,
        )


def add_arguments(parser: argparse.ArgumentParser, defaults: LoopConfig | None = None) -> None:
    """One flag per field of ``LoopConfig`` (``--prompts-per-step``, ``--lr``, ...)."""
    defaults = defaults or LoopConfig()
    for name in _INT_FIELDS:
        parser.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name)
        )
    for name in _FLOAT_FIELDS:
        parser.add_argument("--" + name, type=float, default=getattr(defaults, name))
    parser.add_argument("--trainable", choices=training.TRAINABLE, default=defaults.trainable)


def from_arguments(args: argparse.Namespace) -> LoopConfig:
    """The ``LoopConfig`` of parsed flags (those ``add_arguments`` added; others ignored)."""
    names = (*_INT_FIELDS, *_FLOAT_FIELDS, "trainable")
    config = LoopConfig(**{name: getattr(args, name) for name in names})
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    return config


def default_model_and_tokenizer(
    state: ParallelState, checkpoint: str | None = None
) -> tuple[Any, Any]:
    """The model at ``checkpoint`` (default: the embedded default model), sharded for
    ``state``'s TP rank, and its tokenizer."""
    from ..models import default_checkpoint_dir, load_model
    from ..tokenizer import load_tokenizer

    path = checkpoint or default_checkpoint_dir()
    return load_model(path, state), load_tokenizer(path)
