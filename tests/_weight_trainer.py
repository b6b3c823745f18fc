"""A trainer process for tests/test_weight_updates_coordinator.py (multiprocessing 'spawn'):
a ``WeightSender`` that sends a checkpoint's full tensors when told, optionally with a fault
(an unknown tensor, a wrong shape, or dying midway), and ``TrainerProcess``, the test's
handle on it, which stands in for the sender in ``InferenceClient.update_weights``: its
``send`` has the tensors sent from the other process (its "named tensors" are the command)."""

from __future__ import annotations

import os
import queue
from typing import Any

import torch

UP = "model.layers.0.mlp.up_proj.weight"


def trainer(bucket_bytes: int, inbox: Any, outbox: Any) -> None:
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from megatron_coord.weights import WeightSender

    sender = WeightSender(bucket_bytes=bucket_bytes, timeout_s=30.0)
    outbox.put(sender.source_spec())
    while (command := inbox.get()) is not None:
        path, fault, world_size, version = command
        tensors = load_file(os.path.join(path, "model.safetensors"))
        if fault == "unknown":
            tensors["model.extra.weight"] = torch.zeros(4, 4)
        elif fault == "shape":
            tensors[UP] = tensors[UP][:-2].clone()  # two rows short

        def progress(done: int, total: int, fault: str | None = fault) -> None:
            if fault == "die" and done == 2:
                os._exit(3)  # the trainer vanishes mid-transfer

        try:
            sent = sender.send(tensors.items(), world_size, version=version, progress=progress)
            outbox.put(("sent", sent))
        except Exception as exc:  # noqa: BLE001 - told to the test
            outbox.put(("error", f"{type(exc).__name__}: {exc}"))


class TrainerProcess:
    """The trainer in its own process, with the sender interface ``update_weights`` uses."""

    def __init__(self, bucket_bytes: int = 1 << 20) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=trainer, args=(bucket_bytes, self.inbox, self.outbox))
        self.process.start()
        self.spec = self.outbox.get(timeout=120)
        self.sent: list[dict] = []

    def source_spec(self) -> dict[str, Any]:
        return self.spec

    def send(self, command: tuple[str, str | None], world_size: int, version: str | None = None):
        path, fault = command
        self.inbox.put((path, fault, world_size, version))
        while True:
            try:
                kind, value = self.outbox.get(timeout=0.2)
            except queue.Empty:
                if not self.process.is_alive():
                    raise ConnectionError(
                        f"the trainer died (exit code {self.process.exitcode})"
                    ) from None
                continue
            if kind == "error":
                raise RuntimeError(value)
            self.sent.append(value)
            return value

    def close(self) -> None:
        if self.process.is_alive():
            self.inbox.put(None)
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
