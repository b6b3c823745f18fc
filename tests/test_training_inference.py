"""``TrainingInference`` in a real torchrun world (gloo), DP 2 x TP 1 and DP 1 x TP 2: a training
script trains its own model and generates through the coordinator between steps
(tests/_training_inference_worker.py, one launch per layout with every check inside).

After every update the served greedy tokens equal a freshly built engine's over the same
weights, and the served log-probs equal the training model's own (``token_log_probs``: the
train/inference mismatch, printed as MISMATCH); suspend frees the KV bytes and resume brings
them back; SPMD (every rank its own prompts) and rank 0 alone both work; every version label
reaches every record. A rank that raises in its training step ends the world within
seconds, non-zero, with no process left (the coordinator included). And with
``replicas="tcp://..."`` the same loop runs against a standalone coordinator's joined replica,
the weights sent over torch.distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from _procs import launch_env, processes_with
from test_engine import make_tiny_checkpoint

from megatron_coord.testing.fault_harness import ReplicaJob, StandaloneCoordinator, StatsProbe

pytestmark = pytest.mark.torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_training_inference_worker.py")
LOG_PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ti-llama"))
    make_tiny_checkpoint(path)
    return path


def run_worker(tmp_path, mode: str, checkpoint: str, tp: int, timeout: float, extra=()):
    """Run the worker under torchrun; (completed process, marker, output dir, seconds)."""
    out = tmp_path / f"{mode}-tp{tp}"
    out.mkdir()
    marker = uuid.uuid4().hex
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        WORKER, mode, str(out), checkpoint, str(tp), *extra,
    ]  # fmt: skip
    env = launch_env(marker, tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return done, marker, out, time.monotonic() - started


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2-tp1", "dp1-tp2"])
def test_train_generate_update_between_steps(tmp_path, checkpoint, tp):
    done, marker, out, _ = run_worker(tmp_path, "loop", checkpoint, tp, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert processes_with(marker) == []  # the coordinator process ended with the world
    reports = [json.loads((out / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    worst = 0.0
    served_by = set()
    for rank, report in enumerate(reports):
        steps = report["steps"]
        assert [s["version"] for s in steps] == ["0", "1", "2", "3"]
        assert all(s["update_ok"] for s in steps[:-1])
        assert report["versions"] == ["1", "2", "3", "3"]  # weight_version after each resume
        losses = [s["loss"] for s in steps[:-1]]
        assert losses == sorted(losses, reverse=True), losses  # the steps really train
        for step in steps:
            mine = step["mine"]
            records = step["records"]
            for record in records:
                n = len(record["generated_tokens"])
                assert n == 6 and isinstance(record["generated_text"], str)
                assert record["prompt_tokens"] == record["prompt"]  # in order, its own
                # The served tokens are the fresh engine's over the same weights.
                assert record["generated_tokens"] == record["fresh_tokens"], (rank, step)
                assert record["weight_version_spans"] == [[0, n, step["version"]]]
                assert record["kv_version_spans"] == [[0, 3 + n - 1, step["version"]]]
                diffs = [
                    abs(a - b)
                    for a, b in zip(record["log_probs"], record["train_log_probs"], strict=True)
                ]
                assert len(diffs) == n
                worst = max(worst, *diffs)
                served_by.add(record["data_parallel_rank"])
            # This rank's own prompts are among its TP group's records, in its order.
            prompts = [r["prompt"] for r in records]
            assert any(prompts[i : i + len(mine)] == mine for i in range(len(prompts)))
        # The probe prompt's greedy tokens change as the weights do: the updates are served.
        probe = [next(r for r in s["records"] if r["prompt"] == [5, 6, 7]) for s in steps]
        assert probe[0]["generated_tokens"] != probe[-1]["generated_tokens"]
        # Suspension frees every KV byte; resume brings the same amount back.
        for serving, suspended, resumed in report["kv"]:
            assert serving > 0 and suspended == 0 and resumed == serving
        assert report["update_while_suspended"] == "final" == report["final_version"]
        assert report["coordinator_alive_after"] is False
        bad = report["bad_input"]
        assert bad["failed"] == [1] and bad["kept"] == [True, False], bad
        assert "prompt 1" in bad["message"]
        assert bad["params"].startswith("ValueError") and "temperature" in bad["params"]
        assert bad["version"].startswith("ValueError") and bad["mode"].startswith("ValueError")
        assert bad["prompts"].startswith("TypeError")
        assert "resume()" in bad["generate_while_suspended"]
        # What a trainer sends to replicas elsewhere: the whole checkpoint tensors, rebuilt
        # from this rank's shards.
        assert report["hf_export_error"] == 0.0
        # Parked through a training phase longer than the engine timeout: none taken for dead.
        assert report["alive_after_long_training"] == [True] * (2 // tp)
    # Rank 0 alone generated (a token list and a text prompt); the others went on.
    only = reports[0]["rank0_only"]
    assert len(only) == 2 and all(len(tokens) == 4 for tokens in only)
    assert reports[1]["rank0_only"] is None
    if tp == 1:
        assert served_by == {0, 1}  # SPMD prompts were spread over both replicas
    print(f"MISMATCH tp={tp}: max |served - trained| log-prob = {worst:.2e}")
    assert worst < LOG_PROB_TOLERANCE


def test_a_rank_that_raises_in_training_ends_the_world(tmp_path, checkpoint):
    done, marker, out, _ = run_worker(tmp_path, "raise", checkpoint, 1, timeout=60)
    ended = time.time()
    assert done.returncode != 0
    assert "a bug in the training step" in done.stderr
    pids = [json.loads((out / f"pids.rank{r}").read_text()) for r in (0, 1)]
    assert pids[0]["coordinator"] is not None  # rank 0 had spawned one...
    assert processes_with(marker) == []  # ...and nothing of the world is left
    seconds = ended - float((out / "raised_at").read_text())
    print(f"FAILED WORLD: torchrun ended {seconds:.1f} s after the raise")
    assert seconds < 20


def test_the_same_loop_against_replicas_elsewhere(tmp_path, checkpoint):
    """replicas="tcp://...": a standalone coordinator with one joined replica; the trainer world
    (DP 2) sends its weights over torch.distributed on update_weights."""
    coordinator = StandaloneCoordinator(checkpoint)
    job = ReplicaJob(coordinator.address, checkpoint, log_path=str(tmp_path / "replica.log"))
    probe = StatsProbe(coordinator.address)
    try:
        probe.wait_for(lambda s: len(s["engines"]) == 1, 120.0, "the replica joined")
        done, marker, out, _ = run_worker(
            tmp_path, "loop", checkpoint, 1, timeout=120, extra=[coordinator.address]
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        assert processes_with(marker) == []
        stats = probe.stats()
        assert [e["weight_version"] for e in stats["engines"]] == ["sent-1"]
    finally:
        probe.close()
        job.kill()
        coordinator.kill()
    worst = 0.0
    for rank in (0, 1):
        report = json.loads((out / f"report.rank{rank}.json").read_text())
        assert report["versions"] == ["initial", "sent-1", "sent-1"]
        before, after = report["steps"]
        assert before["update"] == {"published": True, "version": "sent-1"}
        for step, version in ((before, "initial"), (after, "sent-1")):
            for record in step["records"]:
                n = len(record["generated_tokens"])
                assert record["generated_tokens"] == record["fresh_tokens"]
                assert record["weight_version_spans"] == [[0, n, version]]
                pairs = zip(record["log_probs"], record["train_log_probs"], strict=True)
                worst = max(worst, *(abs(a - b) for a, b in pairs))
        # The probe (the last prompt) changed with the sent weights.
        assert before["records"][-1]["generated_tokens"] != after["records"][-1]["generated_tokens"]
    print(f"MISMATCH remote: max |served - trained| log-prob = {worst:.2e}")
    assert worst < LOG_PROB_TOLERANCE
