"""Models and their checkpoints.

- ``llama``: the tensor-parallel Llama, its KV cache and forward pass; ``layers`` its
  (Megatron-style column/row-parallel) layers, ``tp_collectives`` the TP exchanges, ``config``
  its configuration and TP layout;
- ``training``: its training forward (no KV cache, gradients through the TP collectives),
  per-token log-probs, TP-aware gradient norms;
- ``checkpoint``: Hugging Face safetensors checkpoints read shard by shard into it;
- ``default_model``: the embedded default model, written once as such a checkpoint.

A second architecture goes beside ``llama`` with its own loader in ``checkpoint``.
"""

from .checkpoint import load_model, read_config
from .config import ModelConfig
from .default_model import default_checkpoint_dir
from .llama import LlamaModel

__all__ = ["LlamaModel", "ModelConfig", "default_checkpoint_dir", "load_model", "read_config"]
