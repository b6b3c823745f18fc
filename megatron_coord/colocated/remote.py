"""``TrainingInference(replicas="tcp://...")``: the same loop against replicas elsewhere.

The replicas belong to a serving launch or a standalone coordinator's joined jobs; this world
only submits prompts (each rank its own client) and sends weights. ``update_weights`` then
moves the weights over torch.distributed, the weight-update issue's path: every rank rebuilds
the whole Hugging Face tensors from its shard (models/hf_export.py: collective over its TP
group), and global rank 0 alone, the one trainer rank of the transfer, asks the coordinator for
the update with its ``WeightSender`` (``InferenceClient.update_weights``): every replica
receives and applies it, all or nothing. The outcome is shared over the control group, so the
call returns (or raises) on every rank once the version is published.

Suspending concerns only colocated serving: the replicas' memory is not this world's, so
``suspend``/``resume`` here only keep the ranks together (a barrier), and ``kv_cache_bytes``
is 0.
"""

from __future__ import annotations

from typing import Any

from ..models.hf_export import hf_tensors
from .client_thread import ClientThread
from .layout import share


class RemoteReplicas:
    """Rank 0's weight sender, and the update through the coordinator."""

    def __init__(self, model: Any, rank: int, control: Any, sender_options: dict[str, Any]):
        self.model = model
        self.rank = rank
        self.control = control
        self.sender: Any = None
        if rank == 0:
            from ..weights.sender import WeightSender

            self.sender = WeightSender(**sender_options)

    def update(
        self, client: ClientThread, version: str, mode: str, timeout_s: float
    ) -> dict[str, Any]:
        """Send the model's current weights to every replica as ``version`` (collective)."""
        tensors = hf_tensors(self.model)
        outcome: Any = None
        if self.rank == 0:
            try:
                outcome = client.do(
                    lambda c: c.update_weights(
                        version,
                        sender=self.sender,
                        named_tensors=tensors,
                        mode=mode,
                        timeout_s=timeout_s,
                    ),
                    timeout_s + 60.0,
                )
            except Exception as exc:  # noqa: BLE001 - every rank raises it
                outcome = RuntimeError(f"the update to {version!r} failed: {exc}")
        outcome = share(outcome, self.control)
        if isinstance(outcome, Exception):
            raise outcome
        return {"ok": True, **outcome}  # published (else it raised), as colocated results say
