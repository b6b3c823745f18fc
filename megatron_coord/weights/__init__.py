"""Weight updates over torch.distributed: a trainer's tensors to every serving rank.

- ``sender``: ``WeightSender``, the trainer's end (hosts the TCPStore, sends in buckets);
- ``receiver``: each serving rank's end (validates, keeps its shard, copies in place);
- ``manifest``: the names, shapes, dtypes and bucket layout both ends agree on first;
- ``transfer_group``: the process group of one update, over the trainer's store.

The replica's update path that uses the receiver (and the checkpoint and in-place sources) is
``megatron_coord.engine.weight_updates``.
"""

from .sender import DEFAULT_BUCKET_BYTES, WeightSender

__all__ = ["DEFAULT_BUCKET_BYTES", "WeightSender"]
