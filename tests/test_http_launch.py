"""``launch/serve.py --http-port``: the HTTP front end over a real torchrun launch (gloo, two
replicas of a tiny seeded Llama), checked against transformers' own greedy generation."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

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


def test_serve_http_port_over_real_engines(tmp_path, checkpoint) -> None:
    from megatron_coord.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    expected = hf_greedy(checkpoint, [tokenizer.tokenize(p) for p in PROMPTS], N_TOKENS)
    launch = Launch(tmp_path, checkpoint)
    try:
        launch.wait_healthy()
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

        def scrape() -> dict[tuple[str, str], float]:
            text = httpx.get(f"{launch.url}/metrics").text
            return {
                (s.name, s.labels.get("data_parallel_rank", "")): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }

        m = scrape()
        assert m[("megatron_coord_replicas_alive", "")] == 2
        assert m[("megatron_coord_coordinator_up", "")] == 1
        # The engines' heartbeats (every second) reach /metrics through STATS: together the
        # replicas report at least every token generated above.
        generated = r.usage.completion_tokens + lp.usage.completion_tokens
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = scrape()
            reported = sum(
                m.get(("megatron_coord_replica_engine_generated_tokens", rank), 0)
                for rank in ("0", "1")
            )
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
