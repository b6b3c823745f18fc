"""Real torchrun launches (gloo): greedy parity with transformers, two replicas, control
signals, deterministic sampling across runs and replicas, clean shutdown with no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid

import pytest
from _procs import ServeLaunch, cmdline, launch_env, processes_with, torchrun
from test_engine import hf_greedy

pytestmark = pytest.mark.torchrun

PROMPTS = ["Hello world", "The quick brown fox", "abc", "Data parallel inference", "x y z"]
N_TOKENS = 8


def _generate(tmp_path, checkpoint, nproc: int, tp: int, *extra: str) -> list[dict]:
    marker = uuid.uuid4().hex
    out = tmp_path / f"out-{marker}.json"
    cmd = torchrun(
        nproc, "generate.py", "--model", checkpoint, "--tensor-parallel-size", str(tp),
        *[a for p in PROMPTS for a in ("--prompt", p)],
        "--num-tokens-to-generate", str(N_TOKENS), "--output-json", str(out), *extra,
    )  # fmt: skip
    proc = subprocess.run(
        cmd, env=launch_env(marker, tmp_path), capture_output=True, text=True, timeout=150
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert processes_with(marker) == []
    completions = json.loads(out.read_text())
    assert [c["prompt"] for c in completions] == PROMPTS
    for c in completions:
        assert "(dp " in proc.stdout and repr(c["prompt"]) in proc.stdout
    return completions


def _hf_log_probs(checkpoint: str, prompt: list[int], generated: list[int]) -> list[float]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + generated])).logits[0], -1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(generated)]


def test_generate_greedy_matches_transformers_at_tp1_and_tp2(tmp_path, checkpoint, tokenizer):
    prompts = [tokenizer.tokenize(p) for p in PROMPTS]
    expected = hf_greedy(checkpoint, prompts, N_TOKENS)
    tp1 = _generate(tmp_path, checkpoint, 1, 1, "--top-k", "1")
    tp2 = _generate(tmp_path, checkpoint, 4, 2, "--top-k", "1", "--return-log-probs")
    for run in (tp1, tp2):
        for completion, prompt, tokens in zip(run, prompts, expected, strict=True):
            assert completion["prompt_tokens"] == prompt
            assert completion["generated_tokens"] == tokens
            assert completion["generated_text"] == tokenizer.detokenize(tokens)
    assert {c["data_parallel_rank"] for c in tp1} == {0}
    assert {c["data_parallel_rank"] for c in tp2} == {0, 1}
    # Vocab-parallel logits gathered over TP=2 agree with transformers' in fp32.
    for completion, prompt, tokens in zip(tp2, prompts, expected, strict=True):
        reference = _hf_log_probs(checkpoint, prompt, tokens)
        assert completion["generated_log_probs"] == pytest.approx(reference, abs=1e-4)


async def _serve_session(address: str, tokenizer, expected_greedy) -> dict:
    from megatron_coord.client import InferenceClient, RequestError

    client = InferenceClient(address)
    await client.start()
    found = {}
    greedy = {"top_k": 1, "num_tokens_to_generate": N_TOKENS}
    prompts = [tokenizer.tokenize(p) for p in PROMPTS]

    # Greedy results from both replicas are correct.
    records = await asyncio.gather(*(client.add_request(p, greedy) for p in PROMPTS))
    found["greedy_ranks"] = set()
    for record, prompt, tokens in zip(records, prompts, expected_greedy, strict=True):
        (request,) = record["requests"]
        assert request["prompt_tokens"] == prompt and request["generated_tokens"] == tokens
        found["greedy_ranks"].add(request["data_parallel_rank"])

    # Deterministic mode: sampled (no seed) tokens are identical on both replicas.
    sampled = {"top_k": 0, "temperature": 1.0, "num_tokens_to_generate": N_TOKENS}
    records = await asyncio.gather(*(client.add_request(PROMPTS[0], sampled) for _ in range(6)))
    found["sampled"] = [r["requests"][0]["generated_tokens"] for r in records]
    found["sampled_ranks"] = {r["requests"][0]["data_parallel_rank"] for r in records}

    # Streaming: the chunks are a prefix of the final tokens.
    chunks, final = [], None
    stream = {**greedy, "streaming_interval": 2}
    async for item in client.add_request_streaming(PROMPTS[1], stream):
        if "requests" in item:
            final = item["requests"][0]["generated_tokens"]
        else:
            chunks += item["tokens"]
    assert final == expected_greedy[1] and chunks and chunks == final[: len(chunks)]

    # A prompt the engine cannot serve gets an error, and the engines keep serving.
    with pytest.raises(RequestError):
        await client.add_request([10**9], greedy)

    # Pause: acknowledged by all; a request sent meanwhile waits until UNPAUSE.
    await asyncio.wait_for(client.pause_engines(), 60)
    waiting = client.add_request(PROMPTS[2], greedy)
    done, _ = await asyncio.wait([waiting], timeout=1.0)
    found["finished_while_paused"] = bool(done)
    client.unpause_engines()
    record = await asyncio.wait_for(waiting, 60)
    assert record["requests"][0]["generated_tokens"] == expected_greedy[2]

    await asyncio.wait_for(client.stop_engines(), 60)
    client.stop()
    return found


def test_serve_two_replicas_control_and_clean_stop(tmp_path, checkpoint, tokenizer):
    expected = hf_greedy(checkpoint, [tokenizer.tokenize(p) for p in PROMPTS], N_TOKENS)
    server = ServeLaunch(
        tmp_path, checkpoint, 4, 2, "--deterministic-mode", "--max-batch-size", "4"
    )
    try:
        found = asyncio.run(_serve_session(server.address, tokenizer, expected))
        assert server.wait() == 0
    finally:
        server.kill()
    assert processes_with(server.marker) == []
    assert found["greedy_ranks"] == {0, 1}
    assert found["sampled_ranks"] == {0, 1}
    assert all(tokens == found["sampled"][0] for tokens in found["sampled"])
    assert found["sampled"][0] != expected[0]  # really sampled
    assert not found["finished_while_paused"]

    # Another run (generate.py) in deterministic mode samples the very same tokens.
    rerun = _generate(
        tmp_path, checkpoint, 4, 2, "--deterministic-mode", "--top-k", "0", "--temperature", "1.0"
    )
    assert rerun[0]["generated_tokens"] == found["sampled"][0]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_cpu(pids: list[int], seconds: float) -> dict[int, float]:
    """CPU seconds each process used over ``seconds`` of wall time (after a 1 s settle, in
    which the follower finishes loading its shard)."""
    import time

    time.sleep(1.0)
    before = {pid: _cpu_seconds(pid) for pid in pids}
    time.sleep(seconds)
    return {pid: _cpu_seconds(pid) - before[pid] for pid in pids}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_every_process(tmp_path, checkpoint, signum):
    server = ServeLaunch(tmp_path, checkpoint, 2, 2)
    try:
        pids = processes_with(server.marker)
        assert len(pids) >= 4  # torchrun, 2 ranks, the coordinator
        if signum == signal.SIGTERM:
            # Idle, the TP-coordinator blocks on its socket and the follower in the broadcast:
            # a busy spin would burn a whole core (about 2 CPU seconds here).
            ranks = [
                pid
                for pid in pids
                if "serve.py" in cmdline(pid) and "distributed.run" not in cmdline(pid)
            ]
            assert len(ranks) == 2
            assert all(used < 0.5 for used in _idle_cpu(ranks, 2.0).values())
        server.proc.send_signal(signum)
        server.wait()
    finally:
        server.kill()
    assert processes_with(server.marker) == []


def test_losing_the_coordinator_ends_the_launch(tmp_path, checkpoint):
    server = ServeLaunch(tmp_path, checkpoint, 2, 1)  # two replicas, each its own TP-coordinator
    try:
        (coordinator,) = [
            pid for pid in processes_with(server.marker) if "spawn_main" in cmdline(pid)
        ]
        os.kill(coordinator, signal.SIGKILL)
        assert server.wait() != 0  # rank 0 fails, and torchrun ends rank 1
    finally:
        server.kill()
    assert processes_with(server.marker) == []


def test_reachable_address():
    from megatron_coord.launch import reachable_address

    assert reachable_address("tcp://0.0.0.0:5555", "node0") == "tcp://node0:5555"
    assert reachable_address("tcp://[::]:7", "10.0.0.1") == "tcp://10.0.0.1:7"
    assert reachable_address("tcp://127.0.0.1:5555", "node0") == "tcp://127.0.0.1:5555"


def test_read_prompts(tmp_path):
    from megatron_coord.launch import read_prompts

    lines = tmp_path / "p.txt"
    lines.write_text("first\n\nsecond line\n")
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["a", "b\nc"]))
    assert read_prompts(["x"], str(lines)) == ["x", "first", "second line"]
    assert read_prompts(None, str(listed)) == ["a", "b\nc"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    for prompts, path in (([], None), (None, str(bad))):
        with pytest.raises(ValueError):
            read_prompts(prompts, path)
