"""Prefix caching: chained block names, the block pool (refcounts, LRU eviction, events) and
the engine reusing cached blocks with outputs identical to recomputing (TP=1 here; TP=2 in a
real torchrun job below)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys

import pytest
import torch
from _prefix_workload import BLOCK, NEW_TOKENS, prompts, run_wave, run_workload
from test_engine import _request, _run

from megatron_coord.engine import InferenceEngine
from megatron_coord.engine.kv_blocks import BlockPool
from megatron_coord.prefix_hash import ROOT_HASH, block_hashes, chain_hash

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---------------------------------------------------------------------- names
def test_block_hashes_are_chained_and_the_same_in_every_process():
    tokens = list(range(100, 137))
    names = block_hashes(tokens, 16)
    assert len(names) == 2  # the 5 trailing tokens make no full block
    assert names[0] == chain_hash(ROOT_HASH, tokens[:16])
    assert names[1] == chain_hash(names[0], tokens[16:32])
    # A block's name depends on everything before it, not only on its own tokens.
    assert block_hashes([1] * 16 + tokens[16:32], 16)[1] != names[1]
    assert block_hashes(tokens[16:32], 16, previous=names[0]) == names[1:]
    assert all(0 <= n < 2**64 for n in names)
    # Not Python's salted hash(): another interpreter with another seed agrees.
    code = "from megatron_coord.prefix_hash import block_hashes; print(block_hashes(%r, 16))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code % tokens], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == names
    # The spec, for any reimplementation: blake2b-64 of the previous name (8 bytes LE, 0 for
    # the first block) and the tokens as int64 LE; the digest read as an unsigned LE integer.
    data = bytes(8) + struct.pack("<16q", *tokens[:16])
    digest = hashlib.blake2b(data, digest_size=8).digest()
    assert names[0] == int.from_bytes(digest, "little") == 16357126069811691576


# ---------------------------------------------------------------------- the pool
def test_pool_hit_and_miss_and_the_last_prompt_token_is_always_computed():
    pool = BlockPool(8, 4)
    names = block_hashes(list(range(12)), 4)  # 3 full blocks
    table, reused = pool.allocate(names, 12, 14)
    assert reused == 0 and len(table) == 4  # a miss: 14 positions need 4 blocks
    for block, name in zip(table, names, strict=False):
        assert pool.register(block, name)
    pool.free(table)
    assert pool.cached == 3 and pool.available == 8
    # The same 12-token prompt: 2 blocks reused, the 3rd recomputed (it holds the last token).
    again, reused = pool.allocate(names, 12, 14)
    assert reused == 2 and again[:2] == table[:2] and table[2] not in again[2:]
    # A longer prompt with that prefix reuses all 3.
    longer, reused = pool.allocate(names + [123], 13, 13)
    assert reused == 3 and longer[:3] == table[:3]
    assert pool.refcount(table[0]) == 2 and pool.refcount(table[2]) == 1
    assert pool.stats()["prefix_cache_hit_tokens"] == 20
    assert pool.stats()["prefix_cache_queried_tokens"] == 12 + 12 + 13
    # Another chain misses from its first block on.
    _, reused = pool.allocate(block_hashes([9] * 12, 4), 12, 4)
    assert reused == 0


def test_shared_blocks_are_freed_only_when_the_last_user_leaves():
    pool = BlockPool(6, 4)
    names = block_hashes(list(range(9)), 4)
    first, _ = pool.allocate(names, 9, 9)
    for block, name in zip(first, names, strict=False):
        pool.register(block, name)
    second, reused = pool.allocate(names, 9, 9)
    assert reused == 2
    pool.free(first)
    shared = first[:2]
    assert [pool.refcount(b) for b in shared] == [1, 1]
    # Exhaust the pool: the shared blocks are in use, so they are never evicted.
    assert pool.available == 6 - 3
    grab, _ = pool.allocate([], 1, 3 * 4)
    assert not set(grab) & set(second)
    assert pool.allocate([], 1, 1) is None  # nothing left: refused, nothing changed
    assert pool.lookup(names) == shared and [pool.refcount(b) for b in shared] == [1, 1]
    pool.free(second)
    assert [pool.refcount(b) for b in shared] == [0, 0] and pool.available == 3
    assert pool.lookup(names) == shared  # unused now, still cached until evicted


def test_eviction_takes_unused_blocks_least_recently_used_first_and_reports_it():
    pool = BlockPool(4, 2)
    pool.record_events = True
    chains = [block_hashes([c, c], 2) for c in range(4)]  # four 1-block prefixes
    tables = []
    for chain in chains:
        table, _ = pool.allocate(chain, 3, 2)
        pool.register(table[0], chain[0])
        tables.append(table)
    assert pool.drain_events() == {"kv_blocks_stored": [c[0] for c in chains]}
    pool.free(tables[1])
    pool.free(tables[0])
    pool.free(tables[2])  # LRU order now: 1, 0, 2; chain 3 stays in use
    pool.allocate(chains[0], 3, 2)  # a hit refreshes chain 0 (and takes it out of the LRU)
    grabbed, _ = pool.allocate([], 1, 4)  # needs 2 blocks: evicts chain 1, then chain 2
    assert set(grabbed) == {tables[1][0], tables[2][0]}
    assert pool.lookup(chains[1]) == [] and pool.lookup(chains[2]) == []
    assert pool.lookup(chains[3]) == tables[3] and pool.lookup(chains[0]) == tables[0]
    assert pool.drain_events() == {"kv_blocks_evicted": [chains[1][0], chains[2][0]]}
    assert pool.drain_events() == {}
    # A (re-)registration asks for everything cached, flagged as a reset.
    pool.request_snapshot()
    snapshot = pool.drain_events()
    assert snapshot["kv_blocks_reset"] is True
    assert sorted(snapshot["kv_blocks_stored"]) == sorted([chains[0][0], chains[3][0]])


def test_pool_without_caching_names_nothing_and_events_stay_off_by_default():
    pool = BlockPool(4, 2, caching=False)
    table, _ = pool.allocate(block_hashes([1, 2, 3], 2), 3, 3)
    assert not pool.register(table[0], 5) and pool.cached == 0
    pool.free(table)
    assert pool.available == 4
    quiet = BlockPool(4, 2)
    table, _ = quiet.allocate([], 3, 3)
    quiet.register(table[0], 5)
    assert quiet.drain_events() == {}  # followers of a TP group keep no events


# ---------------------------------------------------------------------- the model
def test_model_block_tables_match_one_slot_per_row_and_refuse_shared_writes(model):
    torch.manual_seed(0)
    tokens = torch.randint(0, 50000, (2, 20))
    zeros = torch.zeros(2, dtype=torch.long)
    slots, slot_cache = torch.arange(2), model.allocate_kv_cache(2, 64)
    tables = torch.tensor([[5, 2, 9, 0, 12, 4], [7, 1, 3, 14, 6, 10]])  # blocks of 4, shuffled
    pool = model.allocate_kv_cache(16, 4)
    expected = model(tokens, zeros, slots, slot_cache, True)
    torch.testing.assert_close(
        model(tokens, zeros, tables, pool, True), expected, atol=1e-5, rtol=0
    )
    # A decode step reads the 20 cached positions back through the tables (5 blocks + 1).
    step = expected[:, -1].argmax(-1, keepdim=True)
    at = torch.full((2,), 20)
    torch.testing.assert_close(
        model(step, at, tables, pool), model(step, at, slots, slot_cache), atol=1e-5, rtol=0
    )
    # Rows may share blocks they read, never a place they write.
    with pytest.raises(ValueError, match="twice"):
        model(tokens, zeros, tables[[0, 0]], pool)
    with pytest.raises(ValueError, match="6 blocks of 4"):
        model(tokens, torch.tensor([0, 5]), tables, pool)


# ---------------------------------------------------------------------- the engine
def _engine(model, caching: bool, **kw) -> InferenceEngine:
    kw.setdefault("max_batch_size", 4)
    return InferenceEngine(model, prefix_caching=caching, kv_block_size=BLOCK, **kw)


def test_outputs_identical_with_cache_on_and_off_and_prefill_saved(model):
    on = run_workload(_engine(model, True))
    off = run_workload(_engine(model, False))
    assert on["outputs"] == off["outputs"]
    assert all(len(t) == NEW_TOKENS for wave in on["outputs"] for t in wave)
    # Wave 1: one step, both miss. Wave 2: the repeated 48-token prompt recomputes its last
    # block (16); prefix+3 and prefix[:32]+20 reuse 2 blocks; the unrelated one misses (29).
    # Wave 3: the second turn reuses 4 blocks, the 4th named from generated tokens.
    assert off["prefilled"] == [48 + 53, 48 + 43 + 29 + 52, 73]
    assert on["prefilled"] == [48 + 53, 16 + 11 + 29 + 20, 73 - 64]
    stats = on["stats"]
    assert stats["prefix_cache_hit_tokens"] == 32 * 3 + 64
    assert stats["prefix_cache_queried_tokens"] == 101 + 172 + 73
    assert off["stats"]["prefix_cache_hit_tokens"] == 0 and off["stats"]["kv_blocks_cached"] == 0


def test_block_events_name_blocks_as_the_coordinator_would(model):
    engine = _engine(model, True)
    engine.blocks.record_events = True
    _, first, _ = prompts()
    run_wave(engine, [first[0]], 0)
    stored = engine.blocks.drain_events()["kv_blocks_stored"]
    # 48 prompt tokens + 20 generated: K/V for 67 positions, 4 full blocks; the coordinator
    # names the prompt's from token ids alone.
    assert stored[:3] == block_hashes(first[0], BLOCK) and len(stored) == 4
    assert engine.blocks.cached == 4 and engine.blocks.in_use == 0


def test_eviction_under_memory_pressure_with_requests_in_flight(model):
    # 8 blocks of 16 for requests of 2-3 blocks each (28 prompt tokens + their budget): the
    # queue waits for blocks while slots are free, and admissions evict what finished requests
    # left cached, while others are still decoding.
    rng = random.Random(3)
    batch = [[rng.randrange(50000) for _ in range(28)] for _ in range(6)]
    batch[5] = list(batch[0])  # a repeat: shares the first's blocks if they survived
    budgets = [4, 20, 12, 20, 4, 8]

    def submit(engine):
        for i, (prompt, n) in enumerate(zip(batch, budgets, strict=True)):
            engine.add_request(_request(i, prompt, num_tokens_to_generate=n, termination_id=-1))

    reference = _engine(model, False)
    submit(reference)
    expected = _run(reference)
    engine = _engine(model, True, kv_blocks=8)
    engine.blocks.record_events = True
    submit(engine)
    records, evictions, waited = {}, 0, False
    while engine.has_work:
        in_use = {engine.blocks._hash_of.get(b) for r in engine.active.values() for b in r.blocks}
        result = engine.step()
        waited |= bool(engine.waiting) and bool(engine.free_slots)
        evicted = set(engine.blocks.drain_events().get("kv_blocks_evicted", ()))
        assert not evicted & in_use, "a block in use was evicted"
        evictions += len(evicted) if engine.active else 0
        for record in result.finished:
            records[record["requests"][0]["request_id"]] = record["requests"][0]
    assert waited and evictions > 0
    for i in range(len(batch)):
        assert records[i]["generated_tokens"] == expected[i]["generated_tokens"]
    assert engine.blocks.in_use == 0 and engine.blocks.available == 8


def test_a_failed_step_spoils_no_cached_block(model):
    """A step that fails (here out of memory, after the model wrote K/V) while two requests
    prefill on a reused prefix: one fails, the other starts over, and the cache stays good."""
    from megatron_coord.engine.step_guard import StepGuard
    from megatron_coord.parallel_state import single_process_state
    from megatron_coord.testing.step_faults import StepFaults

    _, first, second = prompts()
    waves = [[first[0]], [second[1], second[3]], [first[0]]]
    reference = _engine(model, False)
    expected = [
        [r["generated_tokens"] for r in run_wave(reference, w, 10 * i)] for i, w in enumerate(waves)
    ]
    engine = _engine(model, True)
    guard = StepGuard(engine, single_process_state())
    got, failed = [], []
    for i, wave in enumerate(waves):
        if i == 1:
            faults = StepFaults(steps={1}, kind="oom").install(engine)  # its first step fails
        for j, prompt in enumerate(wave):
            engine.add_request(
                _request(10 * i + j, prompt, num_tokens_to_generate=NEW_TOKENS, termination_id=-1)
            )
        records = {}
        while engine.has_work:
            outcome = guard.step()
            failed += [request_id for request_id, _ in outcome.failed]
            for record in outcome.result.finished:
                records[record["requests"][0]["request_id"]] = record["requests"][0][
                    "generated_tokens"
                ]
        got.append(records)
    assert faults.raised and guard.failed_steps == 1  # one step (both its prefill groups)
    assert failed == [11]  # the larger footprint fails, 10 starts over
    assert got[1] == {10: expected[1][0]}
    assert got[2] == {20: expected[2][0]} and got[0] == {0: expected[0][0]}
    # The rerun and the repeat reused the prefix: 2 + 2 (+ 2 in the failed step) + 2 blocks.
    assert engine.blocks.stats()["prefix_cache_hit_tokens"] == 16 * (2 + 2 + 2 + 2)
    assert engine.blocks.in_use == 0


def test_a_request_larger_than_the_pool_is_refused_clearly(model):
    engine = _engine(model, True, kv_blocks=2)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(_request(1, list(range(30)), num_tokens_to_generate=10))
    engine.add_request(_request(2, list(range(20)), num_tokens_to_generate=12))  # 32: fits
    assert _run(engine)[2]["generated_length"] == 12


def test_prompt_log_probs_never_reuse_the_cache_and_match(model):
    prompt = prompts()[1][0]
    params = {"num_tokens_to_generate": 4, "return_log_probs": True, "termination_id": -1}
    engine = _engine(model, True)
    first = _run_one(engine, prompt, params)
    second = _run_one(engine, prompt, params)  # cached now, but it needs every prompt logit
    off = _run_one(_engine(model, False), prompt, params)
    assert engine.blocks.stats()["prefix_cache_hit_tokens"] == 0
    assert len(second["prompt_log_probs"]) == len(prompt) - 1
    assert second["prompt_log_probs"] == pytest.approx(off["prompt_log_probs"], abs=1e-5)
    assert first["generated_tokens"] == second["generated_tokens"] == off["generated_tokens"]


def _run_one(engine, prompt, params):
    engine.add_request(_request(7, prompt, **params))
    return _run(engine)[7]


def test_heartbeats_report_block_events_and_stats_that_reach_metrics(model):
    """A real EngineServer's HEARTBEATs: a reset first (registration), then the names of the
    blocks it stored, and cache stats; relayed in STATS they become /metrics gauges."""
    from test_engine_server import Harness, _record
    from test_metrics import scrape

    from megatron_coord.protocol import Headers
    from megatron_coord.serving.metrics import ServingMetrics

    h = Harness(model)  # max_seq_len 64, 2 slots: 8 blocks of 16
    try:
        h.server.heartbeats.interval_s = 0.05
        prompt = prompts()[1][0][:40]
        params = {"top_k": 1, "num_tokens_to_generate": 4, "termination_id": -1}
        reports = []
        for request_id in (1, 2):  # the second reuses the first's 2 full blocks
            h.send([Headers.SUBMIT_REQUEST, request_id, prompt, params])
            while True:
                message = h.message()
                if message[0] == Headers.HEARTBEAT:
                    reports.append(message[1])
                elif _record(message)["request_id"] == request_id:
                    break
        while not reports or reports[-1]["prefix_cache_queried_tokens"] < 80:
            message = h.message()
            if message[0] == Headers.HEARTBEAT:
                reports.append(message[1])
    finally:
        h.close()
    assert reports[0]["kv_blocks_reset"] is True  # the coordinator starts from nothing
    stored = [n for r in reports for n in r.get("kv_blocks_stored", ())]
    assert stored == block_hashes(prompt, 16)  # 43 positions of K/V: 2 full blocks
    assert not any("kv_blocks_evicted" in r for r in reports)
    last = reports[-1]
    assert last["kv_block_size"] == 16 and last["prefix_caching"] is True
    assert last["kv_blocks"] == 8 and last["kv_blocks_cached"] == 2 and last["kv_blocks_free"] == 8
    assert last["prefix_cache_hit_tokens"] == 32 and last["prefix_cache_hit_rate"] == 0.4
    metrics = ServingMetrics()
    metrics.update_from_stats({"engines": [{"data_parallel_rank": 0, "alive": True, "load": last}]})
    s = scrape(metrics)
    r0 = (("data_parallel_rank", "0"),)
    assert s[("megatron_coord_replica_engine_prefix_cache_hit_rate", r0)] == 0.4
    assert s[("megatron_coord_replica_engine_kv_blocks_cached", r0)] == 2
    assert s[("megatron_coord_replica_engine_kv_blocks_free", r0)] == 8


@pytest.mark.torchrun
def test_tp2_outputs_identical_with_cache_on_and_off(checkpoint, tmp_path, model):
    expected = run_workload(_engine(model, True))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.join(HERE, "_prefix_cache_tp_worker.py"),
        checkpoint,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got["on"]["outputs"] == got["off"]["outputs"]
        assert got["on"]["prefilled"] == expected["prefilled"]
        # TP=2 generates what TP=1 does (well-separated logits in the tiny checkpoint).
        assert got["on"]["outputs"] == expected["outputs"]
