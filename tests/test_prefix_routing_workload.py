"""benchmarks/prefix_routing.py's workload: seeded, the same for every configuration, and
within the default model's positions (no launch here: the benchmark itself runs the engines)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "prefix_routing.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("prefix_routing_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def args(bench, *argv):
    """The benchmark's options: its defaults unless ``argv`` says otherwise."""
    return bench.parse_args(list(argv))


def test_workload_is_seeded_and_shaped(bench):
    a = args(bench)
    systems, chats = bench.workload(a)
    again_systems, again = bench.workload(a)
    assert systems == again_systems and [c.__dict__ for c in chats] == [c.__dict__ for c in again]
    assert len(systems) == 4 and all(len(s) == 512 for s in systems)
    assert len(chats) == 64 and {c.system for c in chats} == {0, 1, 2, 3}
    starts = [c.start_s for c in chats]
    assert starts == sorted(starts) and 0 < starts[-1] < 20
    for c in chats:
        assert len(c.users) == 6 and all(len(u) == 48 for u in c.users)
        assert len(c.think_s) == 5 and all(t >= 0 for t in c.think_s)
        assert all(0 < tok < 50256 for u in c.users for tok in u)
    other_systems, other = bench.workload(args(bench, "--seed", "1"))
    assert other_systems != systems


def test_prompts_fit_and_working_set(bench):
    a = args(bench)
    assert (a.user_tokens, a.reply_tokens, a.kv_block_size) == (48, 24, 16)
    assert bench.longest_prompt(a) == 512 + 6 * 48 + 5 * 24
    assert bench.longest_prompt(a) + a.reply_tokens <= 1024
    with pytest.raises(SystemExit):  # a workload that cannot fit the model is refused
        bench.parse_args(["--turns", "12"])
    # 4 system prompts of 32 blocks, then each chat's own 944 - 512 = 432 tokens: 27 blocks.
    assert bench.working_set_blocks(a) == 4 * 32 + 64 * 27
