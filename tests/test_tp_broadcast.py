"""The TP broadcast over a real gloo group (torchrun, world 4 = 2 TP groups of 2).

This file is also the torchrun worker: every rank rebuilds the same seeded batches; the
TP-coordinator sends them and each follower checks that it received exactly those.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest

from megatron_coord.engine.tp_broadcast import HEAD_WORDS, NewRequest, StepInputs
from megatron_coord.sampling_params import SamplingParams


def make_inputs(seed: int) -> StepInputs:
    """A seeded batch: empty, tiny (fits the head) or large (needs the second broadcast)."""
    rng = random.Random(seed)
    size = [0, 1, 3, 40][seed % 4]
    requests = [
        NewRequest(
            request_id=rng.randrange(2**62),
            prompt_tokens=[rng.randrange(50257) for _ in range(rng.choice([1, 5, 300]))],
            params=SamplingParams(
                temperature=rng.random() * 2,
                top_k=rng.randrange(50),
                top_p=rng.random(),
                num_tokens_to_generate=rng.randrange(1, 1000),
                termination_id=rng.choice([None, 50256]),
                return_log_probs=rng.random() < 0.5,
                streaming_interval=rng.randrange(4),
            ),
            seed=rng.randrange(2**64),
        )
        for _ in range(size if seed % 4 != 1 else 0)
    ]
    signals = [rng.choice([5, 7, 8, 9, 10]) for _ in range(rng.randrange(3))]
    if seed % 4 == 1:
        signals += [104, rng.randrange(2**62)]
    return StepInputs(signals, requests)


def _same(a: StepInputs, b: StepInputs) -> bool:
    return a.signals == b.signals and [
        (r.request_id, r.prompt_tokens, r.seed, r.params) for r in a.requests
    ] == [(r.request_id, r.prompt_tokens, r.seed, r.params) for r in b.requests]


def worker() -> None:
    from megatron_coord import parallel_state
    from megatron_coord.engine.tp_broadcast import TPBroadcaster, pack

    state = parallel_state.initialize(tensor_parallel_size=2)
    broadcaster = TPBroadcaster(state)
    sizes = set()
    for seed in range(40):
        # Each TP group sends its own batches: the groups must not cross-talk.
        expected = make_inputs(seed * 10 + state.dp_rank)
        sizes.add(pack(expected).numel() > HEAD_WORDS - 1)
        got = broadcaster.exchange(expected if state.is_tp_coordinator else None)
        if not _same(got, expected):
            raise SystemExit(f"rank {state.rank}: batch {seed} differs")
    assert sizes == {True, False}, "both the one- and two-collective paths must run"
    import torch.distributed as dist

    dist.destroy_process_group()
    print(f"rank {state.rank} ok", flush=True)


@pytest.mark.torchrun
def test_broadcast_delivers_identical_batches_to_followers():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
        "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        os.path.abspath(__file__),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The ranks share one stdout, so their lines may interleave.
    assert sorted(re.findall(r"rank (\d+) ok", proc.stdout)) == ["0", "1", "2", "3"]


def test_single_rank_passes_inputs_through():
    from megatron_coord.engine.tp_broadcast import TPBroadcaster
    from megatron_coord.parallel_state import single_process_state

    inputs = make_inputs(3)
    assert TPBroadcaster(single_process_state()).exchange(inputs) is inputs
    assert not TPBroadcaster(single_process_state()).exchange(None)


if __name__ == "__main__":
    worker()
