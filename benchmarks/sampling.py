"""What the batched sampler's fields and prompt log-probs cost, in process.

    python benchmarks/sampling.py [--batch 32] [--tokens 48] [--prompt-len 32] [--rounds 5]
        [--echo-len 512] [--top-n 5] [--threads 2] [--model DIR]

On the embedded default model (default_checkpoint_dir) unless --model is given:

* decode: ``--batch`` requests decoding together for ``--tokens`` tokens (no early stop), the
  decode steps timed (the step that prefills them is not): plain greedy, temperature sampling
  over the whole vocabulary, every sampling field at once (temperature, top-k, top-p, min-p,
  presence / frequency / repetition penalties, a logit bias, min_tokens, stop_token_ids,
  ignore_eos), and all of them but top-k. The variants alternate round by round, so load from other processes hits all
  alike; tokens/s from the median round. ``sampler_ms`` times the sampler alone on the same
  [batch, vocab] logits (what a step adds beyond the model).
* echo: one ``--echo-len``-token prompt prefilled alone (one-token budget), with and without
  prompt log-probs plus ``--top-n`` alternatives per position (what lm-evaluation-harness's
  ``echo`` + ``logprobs`` asks for), alternating; median step time.

Prints JSON, writes benchmarks/results/<--name>.json and draws benchmarks/results/<--name>.png
(default name: sampling).

The embedded default model has random weights: its next-token distribution is all but uniform
(entropy 10.77 nats of at most 10.82), the worst case for top-p (a 0.95 nucleus holds ~45k of
the 50k tokens, so every step sorts the vocabulary) and min-p (nothing is dropped). A trained
model's distributions are peaked; ``--model`` takes one (any Llama checkpoint directory).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import RESULTS, write_results  # noqa: E402

EOS = 50256


def variants(vocab: int) -> dict[str, dict]:
    rng = random.Random(1)
    every = {
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.95,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.2,
        "logit_bias": {rng.randrange(vocab): rng.uniform(-5, 5) for _ in range(16)},
        "min_tokens": 8,
        "stop_token_ids": [rng.randrange(vocab) for _ in range(4)],
        "ignore_eos": True,
    }
    return {
        "greedy": {"top_k": 1},
        "temperature": {"temperature": 0.8},
        "all_fields": every,
        "all_but_top_k": {k: v for k, v in every.items() if k != "top_k"},
    }


def load(args):
    import torch

    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.models.default_model import default_checkpoint_dir
    from megatron_coord.parallel_state import single_process_state

    torch.set_num_threads(args.threads)
    return load_model(args.model or default_checkpoint_dir(), single_process_state())


def decode_round(model, args, params: dict, seed: int) -> dict:
    """One engine run of ``--batch`` requests; the decode steps' tokens and seconds."""
    from megatron_coord.engine import InferenceEngine
    from megatron_coord.engine.tp_broadcast import NewRequest
    from megatron_coord.sampling_params import SamplingParams

    rng = random.Random(seed)
    engine = InferenceEngine(
        model, max_batch_size=args.batch, max_seq_len=args.prompt_len + args.tokens + 1
    )
    for i in range(args.batch):
        prompt = [rng.randrange(50000) for _ in range(args.prompt_len)]
        p = SamplingParams(num_tokens_to_generate=args.tokens, termination_id=-1, **params)
        engine.add_request(NewRequest(i, prompt, p, seed * 1000 + i))
    engine.step()  # admits and prefills every request (their first token)
    tokens, start = 0, time.perf_counter()
    while engine.has_work:
        tokens += engine.step().tokens
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def sampler_ms(model, args, params: dict, repeat: int = 20) -> float:
    """The sampler alone on fixed [batch, vocab] logits, per step (median)."""
    import torch

    from megatron_coord.engine.running import sampling_state, stop_ids
    from megatron_coord.engine.sampling import Sampler
    from megatron_coord.engine.tp_broadcast import NewRequest
    from megatron_coord.sampling_params import SamplingParams

    vocab = model.config.vocab_size
    logits = torch.randn(args.batch, vocab, generator=torch.Generator().manual_seed(0)) * 3
    sampler = Sampler(args.batch, vocab)
    states = []
    for i in range(args.batch):
        new = NewRequest(i, [1, 2, 3], SamplingParams(**params), i)
        state = sampling_state(new, stop_ids(new.params, frozenset([EOS])), vocab)
        state.slot = i
        sampler.admit(state)
        states.append(state)
    want = [False] * args.batch
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sampler(logits, states, want)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def echo_round(model, args, scored: bool, seed: int) -> float:
    """One prefill of an ``--echo-len``-token prompt, with or without prompt scores (seconds)."""
    from megatron_coord.engine import InferenceEngine
    from megatron_coord.engine.tp_broadcast import NewRequest
    from megatron_coord.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompt = [rng.randrange(50000) for _ in range(args.echo_len)]
    extra = {}
    if scored:
        extra = {
            "return_log_probs": True,
            "top_n_logprobs": args.top_n,
            "return_prompt_top_n_logprobs": True,
        }
    params = SamplingParams(top_k=1, num_tokens_to_generate=1, **extra)
    engine = InferenceEngine(
        model, max_batch_size=1, max_seq_len=args.echo_len + 1, prefix_caching=False
    )
    engine.add_request(NewRequest(0, prompt, params, 0))
    start = time.perf_counter()
    (record,) = engine.step().finished
    elapsed = time.perf_counter() - start
    request = record["requests"][0]
    if scored:
        assert len(request["prompt_log_probs"]) == args.echo_len - 1
        assert len(request["prompt_top_n_logprobs"]) == args.echo_len - 1
    return elapsed


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(out["decode"])
    rates = [out["decode"][n]["tokens_per_s"] for n in names]
    colors = ["#4c72b0", "#dd8452", "#c44e52", "#8172b3"]
    bars = left.bar(names, rates, color=colors[: len(names)])
    for bar, name in zip(bars, names, strict=True):
        ratio = out["decode"][name]["vs_greedy"]
        left.annotate(
            f"{ratio:.2f}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    left.set_ylim(0, max(rates) * 1.15)
    left.set_ylabel("decode tokens/s")
    left.set_title(f"batch {out['config']['batch']}: sampling fields vs greedy")
    echo = out["echo"]
    labels = ["prefill", f"+ prompt log-probs\n+ top-{out['config']['top_n']}"]
    times = [echo["plain_ms"], echo["scored_ms"]]
    right.bar(labels, times, color=["#4c72b0", "#c44e52"])
    right.set_ylabel("step time (ms)")
    right.set_title(f"{out['config']['echo_len']}-token prompt, echo cost {echo['overhead']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--echo-len", type=int, default=512)
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--name", default="sampling", help="results/<name>.json and .png")
    args = parser.parse_args()
    model = load(args)
    kinds = variants(model.config.vocab_size)
    for params in kinds.values():  # warm-up: one short round each
        decode_round(model, argparse.Namespace(**{**vars(args), "tokens": 4}), params, 0)
    rounds: dict[str, list[dict]] = {name: [] for name in kinds}
    for r in range(args.rounds):
        for name, params in kinds.items():
            rounds[name].append(decode_round(model, args, params, r + 1))
    decode = {}
    for name, runs in rounds.items():
        rates = [run["tokens"] / run["seconds"] for run in runs]
        decode[name] = {
            "tokens_per_s": round(statistics.median(rates), 1),
            "best_tokens_per_s": round(max(rates), 1),
            "sampler_ms": round(sampler_ms(model, args, kinds[name]), 3),
        }
    for name in decode:
        decode[name]["vs_greedy"] = round(
            decode[name]["tokens_per_s"] / decode["greedy"]["tokens_per_s"], 3
        )
    echo_round(model, args, True, 0)  # warm-up
    plain, scored = [], []
    for r in range(args.rounds):
        plain.append(echo_round(model, args, False, r))
        scored.append(echo_round(model, args, True, r))
    echo = {
        "plain_ms": round(statistics.median(plain) * 1e3, 2),
        "scored_ms": round(statistics.median(scored) * 1e3, 2),
    }
    echo["overhead"] = round(echo["scored_ms"] / echo["plain_ms"], 3)
    out = {
        "config": {
            "batch": args.batch,
            "tokens": args.tokens,
            "prompt_len": args.prompt_len,
            "rounds": args.rounds,
            "echo_len": args.echo_len,
            "top_n": args.top_n,
            "threads": args.threads,
            "model": args.model or "default",
            "vocab": model.config.vocab_size,
            "hidden": model.config.hidden_size,
            "layers": model.config.num_hidden_layers,
            "all_fields": {k: v for k, v in kinds["all_fields"].items() if k != "logit_bias"},
        },
        "decode": decode,
        "echo": echo,
    }
    write_results(os.path.join(RESULTS, f"{args.name}.json"), out)
    plot(out, os.path.join(RESULTS, f"{args.name}.png"))


if __name__ == "__main__":
    main()
