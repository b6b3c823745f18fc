"""Test machinery for megatron_coord and for users testing their own integrations (as
``torch.testing`` is): production modules never import it.

- ``fake_engine``: engines that answer instantly (or step on a clock) without a model, a
  byte-level tokenizer, and ``python -m megatron_coord.testing.fake_engine``;
- ``fault_harness``: real coordinator and replica processes to kill, stop and restart.
"""
