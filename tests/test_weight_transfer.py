"""A real distributed weight update over gloo: a trainer process sends a checkpoint's full tensors
in small buckets to a TP=2 replica (two processes); each rank keeps exactly the shard the
checkpoint loader would read, holding one bucket beyond it. Failures: an unknown tensor, a
wrong shape on one rank (nothing copied anywhere), the trainer killed mid-transfer (a clear
error, and the replica stops serving until a later update succeeds)."""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import re

import pytest
from _model_scenario import save_hf_checkpoint
from _weight_transfer_worker import NEW, OLD, replica_rank, trainer

from megatron_coord.testing.fault_harness import free_port

pytestmark = pytest.mark.torchrun

BUCKET = 8192  # the model is ~150 KB: dozens of buckets of 4 KB, two at a time


class Job:
    """Two replica ranks and trainers, all spawned; specs and commands go through queues."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.paths = paths
        self.results = self.ctx.Queue()
        self.inboxes = [self.ctx.Queue(), self.ctx.Queue()]
        port = free_port()
        self.ranks = [
            self.ctx.Process(
                target=replica_rank, args=(r, port, paths, self.inboxes[r], self.results)
            )
            for r in range(2)
        ]
        for process in self.ranks:
            process.start()
        self.trainer = None

    def start_trainer(self) -> dict:
        self.trainer_in, self.trainer_out = self.ctx.Queue(), self.ctx.Queue()
        self.trainer = self.ctx.Process(
            target=trainer, args=(BUCKET, self.trainer_in, self.trainer_out)
        )
        self.trainer.start()
        return self.trainer_out.get(timeout=60)

    def update(
        self, version: str, source: dict, ckpt: str, extra=False, die_after=0, wrong_shape_on=-1
    ) -> tuple[list, dict | None]:
        spec = {"version": version, "source": source, "mode": "keep", "stale_versions": []}
        spec.update(timeout_s=20.0, first_rank=1, world_size=3)
        for inbox in self.inboxes:
            inbox.put((spec, wrong_shape_on))
        self.trainer_in.put((self.paths[ckpt], extra, die_after))
        replies = sorted(self.results.get(timeout=60) for _ in range(2))
        sent = None
        with contextlib.suppress(queue.Empty):  # a trainer that died sends nothing
            sent = self.trainer_out.get(timeout=0 if die_after else 30)
        return replies, sent

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        if self.trainer is not None and self.trainer.is_alive():
            self.trainer_in.put(None)
        for process in [*self.ranks, self.trainer]:
            if process is None:
                continue
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()


def test_distributed_updates_and_their_failures(tmp_path):
    paths = {OLD: str(tmp_path / OLD), NEW: str(tmp_path / NEW)}
    save_hf_checkpoint(paths[OLD], seed=6, tie=False)
    save_hf_checkpoint(paths[NEW], seed=7, tie=False)
    job = Job(paths)
    try:
        source = job.start_trainer()
        assert source["kind"] == "distributed" and source["backend"] == "gloo"

        replies, sent = job.update("v2", source, NEW)
        for _, result, broken, equal in replies:
            assert result["ok"] and result["version"] == "v2", result
            assert equal == [NEW] and broken is None  # the shards of a fresh load of v2
            assert 0 < result["buffer_bytes"] <= BUCKET  # one bucket beyond the shard
            assert result["received_bytes"] >= sent["bytes"] > 30 * BUCKET
        assert replies[0][1]["weight_bytes"] == replies[1][1]["weight_bytes"]  # the replica's

        replies, sent = job.update("v3", source, OLD, extra=True)
        assert sent is not None  # the trainer was not left waiting
        for _, result, broken, equal in replies:
            assert not result["ok"] and result["version"] == "v2"
            assert (
                "unknown tensor(s), not in the served model: 'model.extra.weight'"
                in (result["error"])
            )
            assert equal == [NEW] and broken is None  # nothing copied: serving v2 still

        replies, _ = job.update("v4", source, OLD, wrong_shape_on=1)
        for _, result, broken, equal in replies:
            assert not result["ok"]
            assert result["error"].startswith("TP rank 1 (global rank 1): tensor ")
            assert (
                "gate_proj.weight' has shape (96, 64), the served model needs (98, 64)"
                in (result["error"])
            )
            assert equal == [NEW] and broken is None  # rank 0 did not copy either

        replies, sent = job.update("v5", source, OLD, die_after=5)
        assert sent is None
        for _, result, broken, equal in replies:
            assert not result["ok"]
            assert re.match(
                r"the weight transfer broke off after [1-6] of \d+ buckets", result["error"]
            )
            assert "(connection lost): the trainer vanished or stalled" in result["error"]
            assert broken.startswith("the update to 'v5' failed midway")
            assert equal == []  # mixed: neither version

        source = job.start_trainer()  # a new trainer: serving again
        replies, _ = job.update("v6", source, OLD)
        for _, result, broken, equal in replies:
            assert result["ok"] and equal == [OLD] and broken is None
    finally:
        job.close()
