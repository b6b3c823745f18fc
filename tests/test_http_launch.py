"""``launch/serve.py --http-port``: the HTTP front end over a real torchrun launch (gloo, two
replicas of a tiny seeded Llama), checked against transformers' own greedy generation and
log-probabilities -- directly, and through lm-evaluation-harness (a loglikelihood and a
generate_until task on local files in tests/lm_eval_tasks/). One launch serves the module."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from _procs import launch_env, processes_with, torchrun
from prometheus_client.parser import text_string_to_metric_families
from test_engine import EOS, hf_greedy

pytestmark = pytest.mark.torchrun

PROMPTS = ["Hello world", "The quick brown fox"]
N_TOKENS = 8
MODEL = "tiny-llama"


def hf_log_probs(path: str, prompt: list[int], generated: list[int]) -> list[float]:
    """transformers' log-probability of each generated token given everything before it."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = range(len(prompt) - 1, len(prompt) - 1 + len(generated))
    return [log_probs[row, token].item() for row, token in zip(rows, generated, strict=True)]


class Launch:
    """``torchrun --nproc-per-node 2 launch/serve.py --http-port 0`` with its output in a file."""

    def __init__(self, tmp_path, checkpoint: str) -> None:
        self.log = tmp_path / "serve.log"
        self.marker = uuid.uuid4().hex  # inherited by every process of the launch
        env = launch_env(self.marker, tmp_path)
        command = torchrun(
            2, "serve.py", "--model", checkpoint, "--http-port", "0", "--served-model-name", MODEL
        )
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_for("OpenAI-compatible API at ").split()[0].removesuffix("/v1")
        self.address = self._wait_for("coordinator listening at ").split()[0]

    def _wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :]
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} line:\n{self.log.read_text()}")

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("the HTTP server never became healthy")

    def stop(self) -> int:
        from megatron_coord.client import InferenceClient

        async def stop_engines() -> None:
            client = InferenceClient(self.address)
            await client.start()
            await asyncio.wait_for(client.stop_engines(), 60)
            client.stop()

        asyncio.run(stop_engines())
        return self.proc.wait(60)

    def processes(self) -> list[int]:
        """Live processes of this launch (torchrun, ranks, coordinator, HTTP server)."""
        return processes_with(self.marker)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def scrape(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, s.labels.get("data_parallel_rank", "")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def reported_tokens(metrics: dict[tuple[str, str], float]) -> float:
    """The tokens both replicas reported generating (heartbeats, every second)."""
    name = "megatron_coord_replica_engine_generated_tokens"
    return sum(metrics.get((name, rank), 0) for rank in ("0", "1"))


def idle_reported_tokens(url: str, timeout: float = 30.0) -> float:
    """reported_tokens once both replicas report no active request (earlier tests' work all
    counted): the baseline for counting a test's own tokens."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        active = [m.get(("megatron_coord_replica_engine_active", r)) for r in ("0", "1")]
        if active == [0, 0] or time.monotonic() > deadline:
            return reported_tokens(m)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def launch(tmp_path_factory, checkpoint) -> Iterator[Launch]:
    run = Launch(tmp_path_factory.mktemp("launch"), checkpoint)
    try:
        run.wait_healthy()
        yield run
    finally:
        run.kill()


TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")


def hf_prompt_log_probs(
    path: str, prompts: list[list[int]]
) -> tuple[list[list[float]], list[list[bool]]]:
    """transformers' log p(prompt[i] | prompt[:i]) for i >= 1 of each prompt, and whether
    prompt[i] is the likeliest token there."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    values, greedy = [], []
    with torch.no_grad():
        for prompt in prompts:
            log_probs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
            rows = range(1, len(prompt))
            values.append([log_probs[i - 1, prompt[i]].item() for i in rows])
            greedy.append([int(log_probs[i - 1].argmax()) == prompt[i] for i in rows])
    return values, greedy


def run_lm_eval(launch: Launch, checkpoint: str, monkeypatch, tmp_path) -> tuple[object, dict]:
    """lm-evaluation-harness's local-completions model on the two local tasks, offline."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(TASKS)  # the tasks' data_files are relative
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    datasets.config.HF_DATASETS_OFFLINE = True  # read at import: in case it came earlier
    lm = LocalCompletionsAPI(
        base_url=f"{launch.url}/v1/completions",
        model=MODEL,
        tokenizer_backend="huggingface",
        tokenizer=checkpoint,
        tokenized_requests=True,
        batch_size=4,
        max_length=128,
        max_retries=1,
    )
    results = simple_evaluate(
        model=lm,
        tasks=["megatron_coord_tiny_mc", "megatron_coord_tiny_gen"],
        task_manager=TaskManager(include_path=TASKS, include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    return lm, results


def test_lm_eval_through_the_server(launch, checkpoint, monkeypatch, tmp_path) -> None:
    """Per-choice log-likelihoods equal transformers' (within 1e-4 per token, float32), and
    the generations its greedy ones, cut at the task's stop string."""
    from megatron_coord.tokenizer import load_tokenizer

    lm, results = run_lm_eval(launch, checkpoint, monkeypatch, tmp_path)
    samples = results["samples"]

    scored = [(a, r) for s in samples["megatron_coord_tiny_mc"] for a, r in
              zip(s["arguments"], s["resps"], strict=True)]  # fmt: skip
    assert len(scored) == 8  # 3 + 3 + 2 choices
    pairs = [lm._encode_pair(arg[0], arg[1]) for arg, _ in scored]
    reference, greedy = hf_prompt_log_probs(checkpoint, [ctx + cont for ctx, cont in pairs])
    for (ctx, cont), ref, (_, resp) in zip(pairs, reference, scored, strict=True):
        log_likelihood = resp[0][0]
        expected = sum(ref[len(ctx) - 1 :])
        assert abs(log_likelihood - expected) <= 1e-4 * len(cont), (log_likelihood, expected)

    # Each token, as the server reports it for lm-eval's request (echo, logprobs, max_tokens 1).
    ctx, cont = pairs[0]
    client = openai.OpenAI(base_url=f"{launch.url}/v1", api_key="-", max_retries=0)
    r = client.completions.create(
        model=MODEL, prompt=[ctx + cont], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    logprobs = r.choices[0].logprobs
    served = logprobs.token_logprobs[: len(ctx + cont)]
    assert served[0] is None
    assert served[1:] == pytest.approx(reference[0], abs=1e-4)
    # is_greedy needs each prompt position's likeliest token (the engine's prompt top-N, issue
    # 23's engine side); where the engine sends the chosen token alone, it reads True.
    if any(len(top) > 1 for top in logprobs.top_logprobs[1 : len(ctx + cont)]):
        for (ctx, _), flags, (_, resp) in zip(pairs, greedy, scored, strict=True):
            assert resp[0][1] == all(flags[len(ctx) - 1 :])

    tokenizer = load_tokenizer(checkpoint)
    for sample in samples["megatron_coord_tiny_gen"]:
        prompt = tokenizer.tokenize(sample["doc"]["prompt"])
        tokens = hf_greedy(checkpoint, [prompt], 8)[0]
        text = tokenizer.detokenize([t for t in tokens if t != EOS]).split("\n")[0]
        assert sample["resps"][0][0] == text


def test_serve_http_port_over_real_engines(launch, checkpoint) -> None:
    """(Last in the module: it stops the launch.)"""
    from megatron_coord.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    expected = hf_greedy(checkpoint, [tokenizer.tokenize(p) for p in PROMPTS], N_TOKENS)
    before = idle_reported_tokens(launch.url)
    try:
        client = openai.OpenAI(base_url=f"{launch.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]

        # Greedy (temperature 0) completions equal transformers' greedy tokens; the batch of two
        # prompts is spread over both replicas by round robin.
        r = client.completions.create(
            model=MODEL, prompt=PROMPTS, max_tokens=N_TOKENS, temperature=0
        )
        for choice, tokens in zip(r.choices, expected, strict=True):
            stopped = tokens[-1] == EOS
            assert choice.text == tokenizer.detokenize(tokens[:-1] if stopped else tokens)
            assert choice.finish_reason == ("stop" if stopped else "length")
        assert r.usage.completion_tokens == sum(len(t) for t in expected)
        assert r.usage.prompt_tokens == sum(len(tokenizer.tokenize(p)) for p in PROMPTS)

        # Streaming gives the same text as the unary answer, in more than one piece.
        chunks = list(
            client.completions.create(
                model=MODEL, prompt=PROMPTS[1], max_tokens=N_TOKENS, temperature=0, stream=True
            )
        )
        pieces = [c.choices[0].text for c in chunks]
        assert "".join(pieces) == r.choices[1].text
        assert len([p for p in pieces if p]) > 1

        # Chat: the default template (the GPT-2 tokenizer has none), streamed and unary agree.
        messages = [{"role": "user", "content": "Say something"}]
        unary = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0
        )
        streamed = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == unary.choices[0].message.content
        assert unary.usage.completion_tokens > 0

        # Sampled-token log-probabilities equal transformers' log-softmax at each step.
        lp = client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=N_TOKENS, temperature=0, logprobs=0
        )
        logprobs = lp.choices[0].logprobs
        assert "".join(logprobs.tokens) == lp.choices[0].text == r.choices[0].text
        tokens = expected[0][:-1] if expected[0][-1] == EOS else expected[0]
        reference = hf_log_probs(checkpoint, tokenizer.tokenize(PROMPTS[0]), tokens)
        assert logprobs.token_logprobs == pytest.approx(reference, abs=1e-3)

        # A token id outside the vocabulary: the engine refuses it, the client gets a 400.
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)

        m = scrape(launch.url)
        assert m[("megatron_coord_replicas_alive", "")] == 2
        assert m[("megatron_coord_coordinator_up", "")] == 1
        # The engines' heartbeats (every second) reach /metrics through STATS: together the
        # replicas report at least every token generated above (on top of what they had
        # reported, idle, before this test).
        generated = before + r.usage.completion_tokens + lp.usage.completion_tokens
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = scrape(launch.url)
            reported = reported_tokens(m)
            if reported >= generated:
                break
            time.sleep(0.2)
        assert reported >= generated
        assert m[("megatron_coord_replica_engine_active", "0")] == 0

        # torchrun, two ranks, the coordinator and the HTTP server process.
        assert len(launch.processes()) >= 5
        # STOP through the coordinator ends the launch cleanly, HTTP server included.
        assert launch.stop() == 0
        assert launch.processes() == []
    finally:
        launch.kill()
