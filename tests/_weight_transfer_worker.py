"""Processes for tests/test_weight_transfer.py (started with multiprocessing 'spawn').

``replica_rank``: one rank of a TP=2 replica (a gloo group of its own), applying the update
specs it is sent with a WeightUpdater, as the serving loop does between two steps; it reports
each result and which checkpoint its parameters now equal. ``trainer``: a WeightSender sending
a checkpoint's full tensors (optionally with an unknown one, or dying midway)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

OLD, NEW = "old", "new"


def _equal_to(model: Any, paths: dict[str, str], state: Any) -> list[str]:
    from megatron_coord.models.checkpoint import load_model

    mine = dict(model.named_parameters())
    found = []
    for label, path in paths.items():
        fresh = dict(load_model(path, state).named_parameters())
        if all(torch.equal(mine[name], fresh[name]) for name in fresh):
            found.append(label)
    return found


def replica_rank(rank: int, port: int, paths: dict[str, str], inbox: Any, outbox: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from megatron_coord.engine.engine import InferenceEngine
    from megatron_coord.engine.step_guard import StepGuard
    from megatron_coord.engine.weight_updates import WeightUpdater
    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.parallel_state import initialize

    state = initialize(2)
    model = load_model(paths[OLD], state)
    engine = InferenceEngine(model, max_batch_size=2, max_seq_len=32)
    updater = WeightUpdater(engine, state, StepGuard(engine, state).group)
    while (command := inbox.get()) is not None:
        spec, wrong_shape_on = command
        config = model.config
        if state.tp_rank == wrong_shape_on:  # this rank alone expects another MLP width
            model.config = dataclasses.replace(config, intermediate_size=98)
        outcome = updater.apply(spec)
        model.config = config
        outbox.put((rank, outcome.result, engine.weights_broken, _equal_to(model, paths, state)))


def trainer(bucket_bytes: int, inbox: Any, outbox: Any) -> None:
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from megatron_coord.weights import WeightSender

    sender = WeightSender(bucket_bytes=bucket_bytes, timeout_s=20.0)
    outbox.put(sender.source_spec())
    while (command := inbox.get()) is not None:
        path, extra, die_after = command
        tensors = load_file(os.path.join(path, "model.safetensors"))
        if extra:
            tensors["model.extra.weight"] = torch.zeros(4, 4)

        def progress(done: int, total: int, die_after: int = die_after) -> None:
            if done == die_after:
                os._exit(3)  # the trainer vanishes mid-transfer

        outbox.put(sender.send(tensors.items(), world_size=3, progress=progress))
