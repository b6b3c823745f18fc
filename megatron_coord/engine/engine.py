"""A continuous-batching inference engine over one (possibly tensor-parallel) model replica.

Each ``step()`` admits waiting requests into free batch slots (up to ``max_batch_size``) and
the KV blocks they need, decodes one token for every request already running and prefills the
newly admitted ones (which yields their first token). Requests leave when they hit their
termination id, their token budget or the maximum sequence length, and come back as
Megatron-shaped records.

The KV cache is paged (kv_blocks.py): with prefix caching (the default), a prompt whose first
blocks were computed before reuses them and prefills only the rest; full blocks are named once
computed (in ``commit_step``, so a failed step never names a block it may have spoiled).

The engine is pure computation: it never talks ZMQ. Every rank of a TP group runs an identical
engine and feeds it identical inputs (see tp_broadcast), so they all take the same decisions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..prefix_hash import ROOT_HASH, block_hashes, chain_hash
from .kv_blocks import DEFAULT_BLOCK_SIZE, BlockPool
from .sampling import SamplingState, sample
from .tp_broadcast import NewRequest


@dataclass
class RunningRequest:
    """A request inside the engine: its sampling state, KV slot and output so far."""

    new: NewRequest
    sampler: SamplingState
    max_new_tokens: int
    termination_ids: frozenset[int]
    slot: int | None = None
    blocks: list[int] = field(default_factory=list)  # KV block table (positions in order)
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache (not prefilled)
    hashes: list[int] = field(default_factory=list)  # names of its full blocks known so far
    named: int = 0  # leading blocks of the table already named (registered or reused)
    generated: list[int] = field(default_factory=list)
    log_probs: list[float] | None = None
    prompt_log_probs: list[float] | None = None
    streamed: int = 0  # generated tokens already sent as partial replies
    steps_since_stream: int = 0

    @property
    def request_id(self) -> int:
        return self.new.request_id

    @property
    def length(self) -> int:
        return len(self.new.prompt_tokens) + len(self.generated)

    def tokens(self, start: int, end: int) -> list[int]:
        """Its tokens (prompt, then generated) in ``[start, end)``."""
        prompt = self.new.prompt_tokens
        if end <= len(prompt):
            return prompt[start:end]
        cut = len(prompt)
        return prompt[start:] + self.generated[max(0, start - cut) : end - cut]


@dataclass
class StepResult:
    """What one step produced: finished records and streaming chunks ([request_id, tokens])."""

    finished: list[dict[str, Any]] = field(default_factory=list)
    partial: list[list[Any]] = field(default_factory=list)
    tokens: int = 0  # tokens generated in this step
    prefill_tokens: int = 0  # prompt tokens prefilled in this step


@dataclass
class PendingStep:
    """A computed step awaiting ``commit_step``: its batch and the first error it raised."""

    decoding: list[RunningRequest]
    admitted: list[RunningRequest]
    prefill_tokens: int = 0
    error: Exception | None = None


class InferenceEngine:
    """Continuous batching with a KV cache over a LlamaModel-like ``model``.

    ``model`` follows the model contract: ``config`` (vocab_size, max_position_embeddings,
    eos_token_id), ``allocate_kv_cache(blocks, block_len)`` and
    ``forward(tokens, start_positions, block_tables, kv_cache, all_logits=False)``.

    ``kv_blocks`` bounds the KV pool (default: a max-length sequence for every batch slot, the
    memory of an unpaged cache); ``prefix_caching=False`` frees blocks as requests leave.
    """

    def __init__(
        self,
        model: Any,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        termination_id: int | None = None,
        data_parallel_rank: int = 0,
        prefix_caching: bool = True,
        kv_block_size: int = DEFAULT_BLOCK_SIZE,
        kv_blocks: int | None = None,
    ) -> None:
        config = model.config
        limit = config.max_position_embeddings
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_seq_len is not None and not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len must be in [1, {limit}]")
        self.model = model
        self.vocab_size = config.vocab_size
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or limit
        default = termination_id if termination_id is not None else config.eos_token_id
        if default is None:
            default = []
        self.default_termination_ids = frozenset(
            default if isinstance(default, list) else [default]
        )
        self.data_parallel_rank = data_parallel_rank
        self.device = next(model.parameters()).device
        if kv_block_size < 1 or (kv_blocks is not None and kv_blocks < 1):
            raise ValueError("kv_block_size and kv_blocks must be >= 1")
        per_sequence = -(-self.max_seq_len // kv_block_size)
        self.blocks = BlockPool(
            kv_blocks or max_batch_size * per_sequence, kv_block_size, prefix_caching
        )
        self.kv_cache = model.allocate_kv_cache(self.blocks.num_blocks, kv_block_size)
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self.waiting: deque[RunningRequest] = deque()
        self.active: dict[int, RunningRequest] = {}
        self._known: set[int] = set()
        self._done: list[dict[str, Any]] = []  # finished outside a step (aborts, zero budgets)
        self.suspended = False

    # ----------------------------------------------------------------- admission
    def check_request(self, prompt_tokens: Any, max_new_tokens: int = 1) -> str | None:
        """Why this prompt cannot be served (a message), or None if it can."""
        if not isinstance(prompt_tokens, list) or not prompt_tokens:
            return "prompt_tokens must be a non-empty list of token ids"
        if not all(type(t) is int and 0 <= t < self.vocab_size for t in prompt_tokens):
            return f"prompt token ids must be integers in [0, {self.vocab_size})"
        needed = len(prompt_tokens) + (1 if max_new_tokens > 0 else 0)
        if needed > self.max_seq_len:
            return (
                f"prompt of {len(prompt_tokens)} tokens leaves no room to generate within "
                f"the maximum sequence length {self.max_seq_len}"
            )
        footprint = min(len(prompt_tokens) + max_new_tokens, self.max_seq_len)
        blocks = self.blocks.blocks_for(footprint)
        if blocks > self.blocks.num_blocks:
            return (
                f"{footprint} tokens of prompt and budget need {blocks} KV blocks of "
                f"{self.blocks.block_size}, more than the engine's {self.blocks.num_blocks}"
            )
        return None

    def footprint(self, running: RunningRequest) -> int:
        """The KV positions a request may fill: its blocks, reserved at admission."""
        return min(len(running.new.prompt_tokens) + running.max_new_tokens, self.max_seq_len)

    @staticmethod
    def token_budget(new: NewRequest) -> int:
        """How many tokens a request may generate (num_tokens_total wins when given)."""
        p = new.params
        if p.num_tokens_total is not None:
            return max(0, p.num_tokens_total - len(new.prompt_tokens))
        return max(0, p.num_tokens_to_generate)

    def add_request(self, new: NewRequest) -> None:
        """Queue a request; raises ValueError if it cannot be served or its id is in use."""
        budget = self.token_budget(new)
        problem = self.check_request(new.prompt_tokens, budget)
        if problem is None and new.request_id in self._known:
            problem = f"request id {new.request_id} is already in the engine"
        if problem is not None:
            raise ValueError(problem)
        p = new.params
        stops = self.default_termination_ids
        if p.termination_id is not None:
            stops = frozenset([p.termination_id])
        running = RunningRequest(
            new=new,
            sampler=SamplingState(p.temperature, p.top_k, p.top_p, new.seed),
            max_new_tokens=budget,
            termination_ids=stops,
            log_probs=[] if p.return_log_probs else None,
        )
        if self.blocks.caching:
            running.hashes = block_hashes(new.prompt_tokens, self.blocks.block_size)
        self._known.add(new.request_id)
        if budget == 0:
            self._finish(running, "length", self._done)
        else:
            self.waiting.append(running)

    def abort(self, request_id: int) -> bool:
        """Drop a waiting or running request; its ABORTED record comes out of the next step."""
        for running in self.waiting:
            if running.request_id == request_id:
                self.waiting.remove(running)
                self._finish(running, "abort", self._done)
                return True
        running = self.active.get(request_id)
        if running is None:
            return False
        self._finish(running, "abort", self._done)
        return True

    # ----------------------------------------------------------------- suspend
    def suspend(self) -> None:
        """Release accelerator memory: the KV cache moves to host memory (on CUDA only).

        Requests keep their slots, so RESUME continues them where they stopped.
        """
        if self.device.type != "cuda" or self.suspended:
            self.suspended = True
            return
        cache = self.kv_cache
        cache.k = [t.to("cpu") for t in cache.k]
        cache.v = [t.to("cpu") for t in cache.v]
        torch.cuda.empty_cache()
        self.suspended = True

    def resume(self) -> None:
        """Bring the KV cache back to the device after suspend()."""
        if self.suspended and self.device.type == "cuda":
            cache = self.kv_cache
            cache.k = [t.to(self.device) for t in cache.k]
            cache.v = [t.to(self.device) for t in cache.v]
        self.suspended = False

    # ----------------------------------------------------------------- state
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self._done)

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.active)

    def holds(self, request_id: int) -> bool:
        """Whether a request of this id is waiting or running here."""
        return request_id in self._known

    def request_ids(self) -> list[int]:
        """The ids of every request waiting or running here."""
        return [r.request_id for r in self.waiting] + list(self.active)

    def _admit(self) -> list[RunningRequest]:
        """Admit in arrival order while a slot and the KV blocks are there: a request that
        cannot get its blocks waits (and those behind it), until running ones leave."""
        admitted = []
        while self.waiting and self.free_slots:
            running = self.waiting[0]
            # Prompt log probs need every prompt position's logits: no reuse for them.
            hashes = [] if self._wants_prompt_log_probs(running) else running.hashes
            got = self.blocks.allocate(
                hashes, len(running.new.prompt_tokens), self.footprint(running)
            )
            if got is None:
                break
            self.waiting.popleft()
            running.blocks, reused = got
            running.named = reused
            running.cached_tokens = reused * self.blocks.block_size
            running.slot = self.free_slots.pop()
            self.active[running.request_id] = running
            admitted.append(running)
        return admitted

    def _release(self, running: RunningRequest) -> None:
        """Give back a request's batch slot and KV blocks."""
        if running.slot is not None:
            self.free_slots.append(running.slot)
            running.slot = None
        if running.blocks:
            self.blocks.free(running.blocks)
            running.blocks = []

    def _finish(self, running: RunningRequest, reason: str, out: list[dict[str, Any]]) -> None:
        self._release(running)
        self.active.pop(running.request_id, None)
        self._known.discard(running.request_id)
        out.append(self._record(running, reason))

    def _record(self, running: RunningRequest, reason: str) -> dict[str, Any]:
        request = {
            "request_id": running.request_id,
            "prompt": None,
            "prompt_tokens": list(running.new.prompt_tokens),
            "generated_tokens": list(running.generated),
            "generated_length": len(running.generated),
            "generated_log_probs": running.log_probs,
            "prompt_log_probs": running.prompt_log_probs,
            "status": "ABORTED" if reason == "abort" else "COMPLETED",
            "finish_reason": reason,
            "data_parallel_rank": self.data_parallel_rank,
        }
        return {"requests": [request]}

    # ----------------------------------------------------------------- stepping
    def step(self) -> StepResult:
        """Decode one token for each running request and prefill newly admitted ones."""
        pending = self.compute_step()
        if pending.error is not None:
            raise pending.error
        return self.commit_step(pending)

    def compute_step(self) -> PendingStep:
        """Admit, run the model and sample: everything of a step but its bookkeeping.

        A phase (the decode, or one prefill group) that raises does not stop the later ones:
        the first exception is kept in the result, so a rank that fails in sampling or a check
        still issues the model's remaining collectives, as the other ranks of its TP group do.
        Nothing leaves a request (finished, streamed) before ``commit_step``, so a failed step
        can be undone identically on every rank (step_guard.py).
        """
        if self.suspended:
            raise RuntimeError("the engine is suspended; resume() it first")
        pending = PendingStep(list(self.active.values()), self._admit())
        if pending.decoding:
            self._run_phase(pending, self._decode, pending.decoding)
        for group in self._prefill_groups(pending.admitted):
            self._run_phase(pending, self._prefill, group)
            pending.prefill_tokens += len(group) * self._prefill_len(group[0])
        return pending

    @staticmethod
    def _run_phase(pending: PendingStep, phase: Any, batch: list[RunningRequest]) -> None:
        try:
            phase(batch)
        except Exception as exc:  # noqa: BLE001 - kept for the step guard
            if pending.error is None:
                pending.error = exc

    def commit_step(self, pending: PendingStep) -> StepResult:
        """Finish a computed step: termination checks, streaming chunks, finished records."""
        result = StepResult(finished=self._done, prefill_tokens=pending.prefill_tokens)
        self._done = []
        result.tokens = len(pending.decoding) + len(pending.admitted)
        for running in pending.decoding + pending.admitted:
            if self.blocks.caching:
                self._name_blocks(running)
            self._after_token(running, result)
        return result

    def _name_blocks(self, running: RunningRequest) -> None:
        """Name the request's blocks that this step filled, so later prompts can reuse them.

        K/V are written for every position but the newest token's, i.e. ``length - 1``.
        """
        size = self.blocks.block_size
        full = min((running.length - 1) // size, len(running.blocks))
        hashes = running.hashes
        while running.named < full:
            i = running.named
            if i == len(hashes):
                previous = hashes[-1] if hashes else ROOT_HASH
                hashes.append(chain_hash(previous, running.tokens(i * size, (i + 1) * size)))
            self.blocks.register(running.blocks[i], hashes[i])
            running.named = i + 1

    # ----------------------------------------------------------------- failed steps
    def discard(self, running: RunningRequest) -> None:
        """Drop a request without a record (its failure is reported by the caller)."""
        self._release(running)
        self.active.pop(running.request_id, None)
        self._known.discard(running.request_id)

    def requeue(self, batch: list[RunningRequest]) -> None:
        """Send requests back to the head of the queue, to start over from their prompt.

        Their KV slots are freed, their output and sampler reset (same seed): a rerun yields
        exactly the tokens the first run would have.
        """
        for running in reversed(batch):
            self.discard(running)
            self._known.add(running.request_id)
            p = running.new.params
            running.sampler = SamplingState(p.temperature, p.top_k, p.top_p, running.new.seed)
            running.generated = []
            running.log_probs = [] if p.return_log_probs else None
            running.prompt_log_probs = None
            running.streamed = running.steps_since_stream = 0
            # Names of blocks with generated tokens go: the rerun may generate others.
            del running.hashes[len(running.new.prompt_tokens) // self.blocks.block_size :]
            self.waiting.appendleft(running)

    def _tables(self, batch: list[RunningRequest], end: list[int]) -> torch.Tensor:
        """Block tables [B, W] covering positions ``[0, end[b])`` of each row (padded with
        block 0, which the attention mask hides)."""
        size = self.blocks.block_size
        widths = [-(-e // size) for e in end]
        width = max(widths)
        rows = [r.blocks[:w] + [0] * (width - w) for r, w in zip(batch, widths, strict=True)]
        return torch.tensor(rows, device=self.device)

    def _decode(self, batch: list[RunningRequest]) -> None:
        tokens = torch.tensor([[r.generated[-1]] for r in batch], device=self.device)
        lengths = [r.length for r in batch]
        starts = torch.tensor([n - 1 for n in lengths], device=self.device)
        tables = self._tables(batch, lengths)
        logits = self.model.forward(tokens, starts, tables, self.kv_cache)
        self._take_tokens(batch, logits)

    @staticmethod
    def _wants_prompt_log_probs(running: RunningRequest) -> bool:
        p = running.new.params
        return p.return_log_probs and not p.skip_prompt_log_probs

    @staticmethod
    def _prefill_len(running: RunningRequest) -> int:
        """Prompt tokens to compute: those after its reused prefix."""
        return len(running.new.prompt_tokens) - running.cached_tokens

    def _prefill_groups(self, admitted: list[RunningRequest]) -> list[list[RunningRequest]]:
        """Requests with as many tokens to prefill (and equal log-prob needs) share one
        forward call, whatever prefix each reuses."""
        groups: dict[tuple[int, bool], list[RunningRequest]] = {}
        for running in admitted:
            key = (self._prefill_len(running), self._wants_prompt_log_probs(running))
            groups.setdefault(key, []).append(running)
        return list(groups.values())

    def _prefill(self, batch: list[RunningRequest]) -> None:
        prompts = torch.tensor(
            [r.new.prompt_tokens[r.cached_tokens :] for r in batch], device=self.device
        )
        starts = torch.tensor([r.cached_tokens for r in batch], device=self.device)
        tables = self._tables(batch, [len(r.new.prompt_tokens) for r in batch])
        all_logits = self._wants_prompt_log_probs(batch[0])
        logits = self.model.forward(prompts, starts, tables, self.kv_cache, all_logits=all_logits)
        if all_logits:
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            chosen = lp.gather(2, prompts[:, 1:, None])[..., 0]
            for running, row in zip(batch, chosen.tolist(), strict=True):
                running.prompt_log_probs = row
            logits = logits[:, -1]
        self._take_tokens(batch, logits)

    def _take_tokens(self, batch: list[RunningRequest], logits: torch.Tensor) -> None:
        tokens, log_probs = sample(
            logits, [r.sampler for r in batch], [r.log_probs is not None for r in batch]
        )
        for running, token, log_prob in zip(batch, tokens, log_probs, strict=True):
            running.generated.append(token)
            if running.log_probs is not None:
                running.log_probs.append(log_prob)

    def _after_token(self, running: RunningRequest, result: StepResult) -> None:
        reason = None
        if running.generated[-1] in running.termination_ids:
            reason = "stop"
        elif len(running.generated) >= running.max_new_tokens or running.length >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            self._finish(running, reason, result.finished)
            return
        interval = running.new.params.streaming_interval
        if interval > 0:
            running.steps_since_stream += 1
            if running.steps_since_stream >= interval:
                result.partial.append([running.request_id, running.generated[running.streamed :]])
                running.streamed = len(running.generated)
                running.steps_since_stream = 0
