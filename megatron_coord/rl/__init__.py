"""Reinforcement learning on the TP Llama: GRPO's learning core and a toy task.

- ``grpo``: group-relative advantages, the clipped policy loss (+ KL), one policy step;
- ``toy_task``: a verifiable toy task for the default model (answer in numerals);
- ``config``: the loop's hyperparameters (shared by both loops) and their command-line flags;
- ``prototype``: the loop in one process, rollouts from an in-process engine;
- ``loop``: the loop in a torchrun world, rollouts through the coordinator by
  ``TrainingInference`` (run by launch/train_grpo.py).
"""
