"""The README's quick start as a new user meets it: its first command, run exactly as written,
on an empty model cache; and a launch of 4 ranks at once against an empty cache, all of them
asking for the embedded default model at the same moment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pytest
from _procs import ROOT, launch_env, processes_with, torchrun

from megatron_coord.models.default_model import default_checkpoint_path

pytestmark = [pytest.mark.torchrun, pytest.mark.timeout(400)]


def quick_start_commands() -> list[str]:
    """The commands of the README's quick-start block, comments dropped."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the quick start has no bash block"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_quick_start_has_two_commands_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "torchrun" in commands[0] and "launch/generate.py" in commands[0]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert commands[1] in f.read()


def test_the_first_command_as_written_on_an_empty_cache(tmp_path):
    command = quick_start_commands()[0]
    out = os.path.join(ROOT, "out.json")  # where the command, run from the checkout, writes
    saved = tmp_path / "users-out.json"
    if os.path.exists(out):
        os.replace(out, saved)  # a user's own earlier result, put back afterwards
    marker = uuid.uuid4().hex
    env = launch_env(marker, tmp_path)
    assert not os.path.exists(env["MEGATRON_COORD_CACHE"])
    try:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        with open(out, encoding="utf-8") as f:
            completions = json.load(f)
    finally:
        if os.path.exists(out):
            os.remove(out)
        if saved.exists():
            os.replace(saved, out)
    assert processes_with(marker) == []
    assert [c["prompt"] for c in completions] == ["Hello world", "The quick brown fox"]
    for c in completions:
        assert len(c["generated_tokens"]) == 16 and isinstance(c["generated_text"], str)
    assert {c["data_parallel_rank"] for c in completions} == {0, 1}  # two replicas served


def test_four_ranks_at_once_on_an_empty_cache(tmp_path):
    marker = uuid.uuid4().hex
    out = tmp_path / "out.json"
    prompts = ["Hello world", "The quick brown fox", "abc", "x y z"]
    cmd = torchrun(
        4, "generate.py", *[a for p in prompts for a in ("--prompt", p)],
        "--num-tokens-to-generate", "4", "--output-json", str(out),
    )  # fmt: skip
    env = launch_env(marker, tmp_path)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert processes_with(marker) == []
    completions = json.loads(out.read_text())
    assert [c["prompt"] for c in completions] == prompts
    assert all(len(c["generated_tokens"]) == 4 for c in completions)
    cache = env["MEGATRON_COORD_CACHE"]
    dirs = [n for n in os.listdir(cache) if os.path.isdir(os.path.join(cache, n))]
    expected = os.path.basename(default_checkpoint_path())
    assert dirs == [expected]  # one complete copy, no temporary dirs
