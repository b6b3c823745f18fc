"""launch/train_grpo.py under torchrun (DP 2 x TP 1, gloo): two tiny GRPO steps through the
coordinator write the per-step log (its shape, versions step-0 then step-1 each serving its
own step's rollouts, rewards in [0, 1]) and leave no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from _procs import launch_env, processes_with, torchrun

from megatron_coord.models.default_model import cache_root

pytestmark = pytest.mark.torchrun

FIELDS = ("step", "mean_reward", "weight_version", "rollout_s", "train_s", "update_s")
TINY = (
    "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
)  # fmt: skip


def test_two_tiny_steps_write_the_log(tmp_path):
    marker = uuid.uuid4().hex
    out = tmp_path / "grpo.json"
    proc = subprocess.run(
        torchrun(2, "train_grpo.py", *TINY, "--output-json", str(out)),
        # The shared cache: the default model is written once (flock-guarded), not per test.
        env={**launch_env(marker, tmp_path), "MEGATRON_COORD_CACHE": cache_root()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = json.loads(out.read_text())
    assert [entry["step"] for entry in log] == [0, 1]
    for entry in log:
        assert set(FIELDS) <= set(entry), entry
        assert 0.0 <= entry["mean_reward"] <= 1.0
        assert all(entry[k] >= 0.0 for k in ("rollout_s", "train_s", "update_s"))
        # every rank's share: 2 prompts x 2 rollouts over the 2 replicas, 4 tokens each at most
        assert entry["rollouts"] == 4 and 0 < entry["rollout_tokens"] <= 16
        # the rollouts of step k came from weights version step-k alone (their spans say so)
        assert entry["served_versions"] == [entry["weight_version"]]
    assert [entry["weight_version"] for entry in log] == ["step-0", "step-1"]
    assert "rewards:" in proc.stdout and "wall:" in proc.stdout
    deadline = time.monotonic() + 10  # torchrun has exited: its children follow at once
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


def test_prompts_are_dealt_and_spans_read():
    from megatron_coord.parallel_state import ParallelState
    from megatron_coord.rl.config import LoopConfig
    from megatron_coord.rl.loop import run, served_versions, share

    def state(dp_rank: int) -> ParallelState:
        return ParallelState(dp_rank, 2, 1, 0, dp_rank, 2, None, dp_rank, "gloo", None)

    prompts = [5, 1, 4, 1, 3]
    assert share(prompts, state(0)) == [5, 4, 3] and share(prompts, state(1)) == [1, 1]
    records = [
        {"weight_version_spans": [[0, 3, "step-1"]]},
        {"weight_version_spans": [[0, 2, "step-1"], [2, 4, "step-2"]]},
        {"weight_version_spans": []},
    ]
    assert served_versions(records) == ["step-1", "step-2"]
    # fewer prompts than replicas: one would train on nothing while the other waits for it
    with pytest.raises(ValueError, match="at least the number of data-parallel replicas"):
        run(None, None, None, state(0), LoopConfig(prompts_per_step=1))


def test_bad_arguments_are_refused_before_anything_starts():
    script = torchrun(1, "train_grpo.py")[-1]  # the launch file itself, run without torchrun
    proc = subprocess.run(
        [sys.executable, script, "--group-size", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--group-size must be >= 1" in proc.stderr, proc.stderr
