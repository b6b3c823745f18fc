"""Prompt log-probs and top-N against transformers' log-softmax on the same checkpoint, with
the prefix cache on and off, at TP=1 in process and at TP=2 in a real torchrun (gloo) world
whose requests travel through the TP broadcast."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from _sampling_workload import BLOCK, EOS, PROMPT, run_workload

from megatron_coord.engine import InferenceEngine, log_probs
from megatron_coord.engine.tp_broadcast import NewRequest
from megatron_coord.sampling_params import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOL = 1e-4
PROMPTS = {"1": PROMPT, "2": PROMPT[:20], "3": PROMPT, "5": PROMPT[:9]}


@pytest.fixture(scope="module")
def hf_log_softmax(checkpoint):
    """tokens -> transformers' log-softmax [len, vocab] over them (float32)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def run(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), -1)

    return run


def _engine(model, caching: bool) -> InferenceEngine:
    return InferenceEngine(
        model, max_batch_size=4, max_seq_len=64, prefix_caching=caching, kv_block_size=BLOCK
    )


def _check_top_n(got: list[dict], rows: torch.Tensor) -> None:
    for d, row in zip(got, rows, strict=True):
        best = torch.topk(row, len(d))
        assert [int(k) for k in d] == best.indices.tolist()
        assert list(d.values()) == pytest.approx(best.values.tolist(), rel=TOL, abs=TOL)


def check_against_transformers(results: dict, hf_log_softmax) -> None:
    """Every scored request's prompt and generated log-probs (and top-N) are transformers'."""
    for rid, prompt in PROMPTS.items():
        r = results[rid]
        lp = hf_log_softmax(prompt + r["generated_tokens"])
        n = len(prompt)
        assert r["prompt_log_probs"] == pytest.approx(
            [lp[i - 1, prompt[i]].item() for i in range(1, n)], abs=TOL
        ), rid
        expected = [lp[n - 1 + j, t].item() for j, t in enumerate(r["generated_tokens"])]
        # Decoded positions go through the KV cache in a batch: float32 noise of ~1e-4
        # relative on this checkpoint's large logits (the prompt's are exact to 1e-4).
        assert r["generated_log_probs"] == pytest.approx(expected, rel=TOL, abs=TOL), rid
        if r["prompt_top_n_logprobs"] is not None:
            assert len(r["prompt_top_n_logprobs"]) == n - 1
            _check_top_n(r["prompt_top_n_logprobs"], lp[: n - 1])
            _check_top_n(r["generated_top_n_logprobs"], lp[n - 1 : n - 1 + len(expected)])


def _same_outputs(a: dict, b: dict, tol: float = 0.0) -> None:
    """Equal tokens and reasons; floats within ``tol`` (exactly equal at 0)."""
    assert a.keys() == b.keys()
    for rid in a:
        x, y = a[rid], b[rid]
        assert x["generated_tokens"] == y["generated_tokens"], rid
        assert x["finish_reason"] == y["finish_reason"], rid
        for name in ("generated_log_probs", "prompt_log_probs"):
            if x[name] is None:
                assert y[name] is None
            else:
                assert x[name] == pytest.approx(y[name], abs=tol), (rid, name)


def test_prompt_log_probs_match_transformers_with_the_cache_on_and_off(model, hf_log_softmax):
    on, off = run_workload(_engine(model, True)), run_workload(_engine(model, False))
    check_against_transformers(on, hf_log_softmax)
    check_against_transformers(off, hf_log_softmax)
    _same_outputs(on, off, tol=1e-5)
    # PROMPT was cached by request 0: the scored requests recompute it, the plain one reuses
    # its first (37 - 1) // 8 = 4 blocks.
    assert on["4"]["cached_tokens"] == 32 and off["4"]["cached_tokens"] == 0
    assert on["1"]["cached_tokens"] == on["3"]["cached_tokens"] == 0
    # Scores asked without top-N carry none; a request without log-probs carries none at all.
    assert on["2"]["prompt_top_n_logprobs"] is None and on["0"]["prompt_log_probs"] is None


def test_the_sampling_fields_of_the_workload(model):
    results = run_workload(_engine(model, True))
    assert results["7"]["generated_tokens"] == [EOS] * 6  # ignore_eos: to the budget
    assert results["7"]["finish_reason"] == "length"
    forced = results["8"]["generated_tokens"]  # EOS at +100, min_tokens 4: stops at the 5th
    assert len(forced) == 5 and EOS not in forced[:4] and forced[4] == EOS
    assert results["8"]["finish_reason"] == "stop"
    every = results["5"]
    assert not {7, EOS} & set(every["generated_tokens"][:3])
    if every["finish_reason"] == "stop":
        assert every["generated_tokens"][-1] in {7, EOS}


def test_prompt_scores_are_computed_a_chunk_at_a_time(model, monkeypatch):
    params = SamplingParams(
        top_k=1,
        num_tokens_to_generate=2,
        return_log_probs=True,
        top_n_logprobs=2,
        return_prompt_top_n_logprobs=True,
    )

    def run() -> dict:
        engine = _engine(model, False)
        for rid in (0, 1):  # two rows of one length: one forward, chunked by position
            engine.add_request(NewRequest(rid, PROMPT[rid : rid + 29], params, 0))
        out = {}
        while engine.has_work:
            for record in engine.step().finished:
                out[record["requests"][0]["request_id"]] = record["requests"][0]
        return out

    whole = run()
    calls = []
    output = model.output_logits
    monkeypatch.setattr(log_probs, "CHUNK_ELEMENTS", 3 * model.config.vocab_size)
    monkeypatch.setattr(model, "output_logits", lambda h: calls.append(h.shape[1]) or output(h))
    chunked = run()
    assert max(calls) == 1 and len(calls) == 29  # [2 rows, 1 position, vocab] at a time
    for rid in (0, 1):
        # The same values up to the matmul's float rounding on another shape.
        assert chunked[rid]["prompt_log_probs"] == pytest.approx(
            whole[rid]["prompt_log_probs"], abs=1e-5
        )
        for a, b in zip(
            chunked[rid]["prompt_top_n_logprobs"], whole[rid]["prompt_top_n_logprobs"], strict=True
        ):
            assert list(a) == list(b) and list(a.values()) == pytest.approx(
                list(b.values()), abs=1e-5
            )
        assert chunked[rid]["generated_tokens"] == whole[rid]["generated_tokens"]


@pytest.mark.torchrun
def test_tp2_prompt_log_probs_and_sampling_fields(checkpoint, tmp_path, model, hf_log_softmax):
    import subprocess

    expected = run_workload(_engine(model, True))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.join(HERE, "_sampling_tp_worker.py"),
        checkpoint,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = []
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    assert ranks[0] == ranks[1]  # every rank of the group: the same records, bit for bit
    got = ranks[0]
    check_against_transformers(got["on"], hf_log_softmax)
    check_against_transformers(got["off"], hf_log_softmax)
    _same_outputs(got["on"], got["off"], tol=1e-5)
    assert got["on"]["4"]["cached_tokens"] == 32 and got["on"]["1"]["cached_tokens"] == 0
    # TP=2 samples what TP=1 does, every field in use (well-separated logits).
    _same_outputs(got["on"], expected, tol=TOL)
