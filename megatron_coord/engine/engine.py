"""A continuous-batching inference engine over one (possibly tensor-parallel) model replica.

Each ``step()`` admits waiting requests into free batch slots (up to ``max_batch_size``) and
the KV blocks they need, decodes one token for every request already running and prefills the
newly admitted ones (which yields their first token). Requests leave when they hit their
termination id, their token budget or the maximum sequence length, and come back as
Megatron-shaped records.

The KV cache is paged (kv_blocks.py): with prefix caching (the default), a prompt whose first
blocks were computed before reuses them and prefills only the rest; full blocks are named once
computed (in ``commit_step``, so a failed step never names a block it may have spoiled).

Weights change while it serves (weight_versions.py): ``change_version`` moves it to a new
weight version at a step boundary (its requests aborted, kept or recomputed; the prefix cache
forgotten, its blocks keyed by version), and every record and streaming chunk says which
version produced each token and computed the KV it was decoded over. SUSPEND and RESUME
release and restore its memory (suspension.py).

A request that asks for prompt log-probs (or prompt top-N) reuses no cached block (as vLLM's
engine): the logits of a position come from the last layer's hidden state there, which needs
every layer at every position -- exactly the prefill that cached KV saves, so reusing it would
save nothing for that request. It prefills its whole prompt (its scores are then correct
whatever the cache holds, computed a chunk of positions at a time: log_probs.py), and its blocks
are named as any request's, so later requests do reuse them. Its ``cached_tokens`` is 0.

The engine is pure computation: it never talks ZMQ. Every rank of a TP group runs an identical
engine and feeds it identical inputs (see tp_broadcast), so they all take the same decisions.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from ..prefix_hash import ROOT_HASH, block_hashes, chain_hash, version_salt
from . import suspension
from .kv_blocks import DEFAULT_BLOCK_SIZE, BlockPool
from .log_probs import prompt_scores
from .running import PendingStep, RunningRequest, StepResult, sampling_state, stop_ids
from .sampling import Sampler
from .tp_broadcast import NewRequest
from .weight_versions import VersionChange, change_version

INITIAL_VERSION = "initial"  # a replica's weight version before any update, unless labelled

__all__ = ["InferenceEngine", "PendingStep", "RunningRequest", "StepResult"]


class InferenceEngine:
    """Continuous batching with a KV cache over a LlamaModel-like ``model``.

    ``model`` follows the model contract: ``config`` (vocab_size, max_position_embeddings,
    eos_token_id), ``allocate_kv_cache(blocks, block_len)`` and
    ``forward(tokens, start_positions, block_tables, kv_cache)`` (last-position logits), and
    for prompt log-probs ``hidden_states(...)`` (final hidden states) and ``output_logits``.

    ``kv_blocks`` bounds the KV pool (default: a max-length sequence for every batch slot, the
    memory of an unpaged cache); ``prefix_caching=False`` frees blocks as requests leave.
    ``weight_version`` labels the weights it starts with.
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
        weight_version: str = INITIAL_VERSION,
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
        self.weight_version = weight_version
        self.blocks.salt = version_salt(weight_version)
        self.kv_cache = model.allocate_kv_cache(self.blocks.num_blocks, kv_block_size)
        self.sampler = Sampler(max_batch_size, self.vocab_size, self.device, self.max_seq_len)
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self.waiting: deque[RunningRequest] = deque()
        self.active: dict[int, RunningRequest] = {}
        self._known: set[int] = set()
        self._done: list[dict[str, Any]] = []  # finished outside a step (aborts, zero budgets)
        self.suspended = False
        self.weights_offloaded = False
        # Why the weights may be a mix of two versions (an update failed midway): no step
        # runs until a later update succeeds (weight_updates.py).
        self.weights_broken: str | None = None

    # ----------------------------------------------------------------- admission
    def check_request(
        self, prompt_tokens: Any, max_new_tokens: int = 1, params: Any = None
    ) -> str | None:
        """Why this prompt (and these SamplingParams) cannot be served (a message), or None."""
        if params is not None:
            problem = self._check_token_ids(params)
            if problem is not None:
                return problem
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

    def _check_token_ids(self, params: Any) -> str | None:
        """Token ids in the sampling params must be the model's (validated as integers)."""
        vocab = self.vocab_size
        for name in ("stop_token_ids", "logit_bias"):
            ids = getattr(params, name, None) or ()
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                return f"sampling_params.{name}: token id {bad} is not in [0, {vocab})"
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
        problem = self.check_request(new.prompt_tokens, budget, new.params)
        if problem is None and new.request_id in self._known:
            problem = f"request id {new.request_id} is already in the engine"
        if problem is not None:
            raise ValueError(problem)
        stops = stop_ids(new.params, self.default_termination_ids)
        running = RunningRequest(
            new=new,
            sampler=sampling_state(new, stops, self.vocab_size),
            max_new_tokens=budget,
            termination_ids=stops,
        )
        running.reset_output()
        if self.blocks.caching:
            running.hashes = block_hashes(new.prompt_tokens, self.blocks.block_size)
        self._known.add(new.request_id)
        if budget == 0:
            self.finish(running, "length", self._done)
        else:
            self.waiting.append(running)

    def abort(self, request_id: int) -> bool:
        """Drop a waiting or running request; its ABORTED record comes out of the next step."""
        for running in self.waiting:
            if running.request_id == request_id:
                self.waiting.remove(running)
                self.finish(running, "abort", self._done)
                return True
        running = self.active.get(request_id)
        if running is None:
            return False
        self.finish(running, "abort", self._done)
        return True

    # ----------------------------------------------------------------- suspend, versions
    def suspend(self, offload_weights: bool = False) -> None:
        """Free the KV cache (and optionally move the weights to CPU memory): suspension.py.

        Requests keep their slots, so RESUME continues them where they stopped.
        """
        suspension.suspend(self, offload_weights)

    def resume(self) -> None:
        """Restore what suspend() released, the running requests' KV included."""
        suspension.resume(self)

    @property
    def kv_bytes(self) -> int:
        return suspension.kv_bytes(self)

    @property
    def weight_bytes(self) -> int:
        return suspension.weight_bytes(self.model)

    def change_version(
        self, version: str, mode: str = "keep", stale_versions: Any = ()
    ) -> VersionChange:
        """The weights are now ``version``'s: settle the requests in flight as ``mode`` says
        (weight_versions.py); the records of those it ended are in the result."""
        return change_version(self, version, mode, stale_versions)

    def take_finished(self) -> list[dict[str, Any]]:
        """The records finished outside a step (aborts), for a replica that does not step."""
        done, self._done = self._done, []
        return done

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
            # Prompt log-probs need the logits of every prompt position, so no reuse: those
            # are the final hidden states of every position, i.e. the whole prefill, which
            # cached KV would not save (engine docstring). Its blocks are named for others.
            hashes = [] if running.wants_prompt_scores else running.hashes
            got = self.blocks.allocate(
                hashes, len(running.new.prompt_tokens), self.footprint(running)
            )
            if got is None:
                break
            self.waiting.popleft()
            running.blocks, reused = got
            running.named = reused
            running.cached_tokens = reused * self.blocks.block_size
            running.slot = running.sampler.slot = self.free_slots.pop()
            version = self.weight_version
            running.weight_marks = [(0, version)]
            running.kv_marks = [(0, version)]
            running.salt = self.blocks.salt
            self.sampler.admit(running.sampler)
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

    def finish(self, running: RunningRequest, reason: str, out: list[dict[str, Any]]) -> None:
        """End a request: free its slot and blocks, append its record to ``out``."""
        self._release(running)
        self.active.pop(running.request_id, None)
        self._known.discard(running.request_id)
        out.append(running.record(reason, self.data_parallel_rank))

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
        if self.weights_broken is not None:
            raise RuntimeError(f"the engine does not serve: {self.weights_broken}")
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
                self.name_blocks(running)
            self._after_token(running, result)
        return result

    def name_blocks(self, running: RunningRequest) -> None:
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
            self.blocks.register(running.blocks[i], hashes[i], running.salt)
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
            running.sampler = sampling_state(running.new, running.termination_ids, self.vocab_size)
            running.reset_output()
            # Names of blocks with generated tokens go: the rerun may generate others.
            del running.hashes[len(running.new.prompt_tokens) // self.blocks.block_size :]
            self.waiting.appendleft(running)

    def block_table(self, batch: list[RunningRequest], end: list[int]) -> torch.Tensor:
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
        tables = self.block_table(batch, lengths)
        logits = self.model.forward(tokens, starts, tables, self.kv_cache)
        self._take_tokens(batch, logits)

    @staticmethod
    def _prefill_len(running: RunningRequest) -> int:
        """Prompt tokens to compute: those after its reused prefix."""
        return len(running.new.prompt_tokens) - running.cached_tokens

    def _prefill_groups(self, admitted: list[RunningRequest]) -> list[list[RunningRequest]]:
        """Requests with as many tokens to prefill (and equal log-prob needs) share one
        forward call, whatever prefix each reuses."""
        groups: dict[tuple[int, bool], list[RunningRequest]] = {}
        for running in admitted:
            key = (self._prefill_len(running), running.wants_prompt_scores)
            groups.setdefault(key, []).append(running)
        return list(groups.values())

    def _prefill(self, batch: list[RunningRequest]) -> None:
        prompts = torch.tensor(
            [r.new.prompt_tokens[r.cached_tokens :] for r in batch], device=self.device
        )
        starts = torch.tensor([r.cached_tokens for r in batch], device=self.device)
        tables = self.block_table(batch, [len(r.new.prompt_tokens) for r in batch])
        if not batch[0].wants_prompt_scores:
            logits = self.model.forward(prompts, starts, tables, self.kv_cache)
            self._take_tokens(batch, logits)
            return
        # Every row prefills from position 0 (no reuse): its scores cover the whole prompt.
        hidden = self.model.hidden_states(prompts, starts, tables, self.kv_cache)
        top_ns = [r.new.params.top_n_logprobs if self._prompt_top_n(r) else 0 for r in batch]
        scores = prompt_scores(self.model.output_logits, hidden, prompts, top_ns, self.vocab_size)
        for running, log_probs, top_n in zip(batch, scores.log_probs, scores.top_n, strict=True):
            p = running.new.params
            if p.return_log_probs and not p.skip_prompt_log_probs:
                running.prompt_log_probs = log_probs
            running.prompt_top_n = top_n
        self._take_tokens(batch, scores.last_logits)

    @staticmethod
    def _prompt_top_n(running: RunningRequest) -> bool:
        p = running.new.params
        return p.top_n_logprobs > 0 and p.return_prompt_top_n_logprobs

    def _take_tokens(self, batch: list[RunningRequest], logits: torch.Tensor) -> None:
        draw = self.sampler(
            logits, [r.sampler for r in batch], [r.log_probs is not None for r in batch]
        )
        for i, running in enumerate(batch):
            running.generated.append(draw.tokens[i])
            if running.log_probs is not None:
                running.log_probs.append(draw.log_probs[i])
            if running.top_n is not None:
                running.top_n.append(draw.top_n[i])

    def _after_token(self, running: RunningRequest, result: StepResult) -> None:
        reason = None
        generated = running.generated
        if generated[-1] in running.termination_ids and len(generated) > running.sampler.min_tokens:
            reason = "stop"
        elif len(running.generated) >= running.max_new_tokens or running.length >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            self.finish(running, reason, result.finished)
            return
        interval = running.new.params.streaming_interval
        if interval > 0:
            running.steps_since_stream += 1
            if running.steps_since_stream >= interval:
                result.partial.append(running.partial())
                running.steps_since_stream = 0
