"""prefix_aware routing and its index: longest prefix, load factor, exact and approximate
index, removal and rejoin, determinism, equality with least_loaded, memory at 1M blocks."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from megatron_coord.coordinator.prefix_index import BlockNamer, PrefixIndex
from megatron_coord.coordinator.routing import LeastLoaded, PrefixAware, make_policy
from megatron_coord.prefix_hash import block_hashes

A, B, C = b"a", b"b", b"c"
OURS = {"kv_block_size": 4, "prefix_caching": True}  # an engine of ours, exact


def route(policy, request_id: int, prompt: list[int], budget: int = 0) -> bytes:
    engine = policy.choose(prompt)
    policy.on_submit(engine, request_id, prompt, budget)
    return engine


def policy_of(engines=(A, B, C), info=None, **options) -> PrefixAware:
    policy = make_policy("prefix_aware", list(engines), engine_info=lambda engine: info, **options)
    assert isinstance(policy, PrefixAware) and policy.needs_tokens and policy.tracks_load
    return policy


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(count)]


def test_block_namer_gives_the_engines_names():
    namer = BlockNamer(capacity=8)
    for size in (1, 4, 16):
        prompt = tokens(size, 70)
        assert namer.names(prompt, size) == block_hashes(prompt, size)
        assert namer.names(prompt, size) == block_hashes(prompt, size)  # memoized, bounded
    assert namer.names([1, 2, 3], 4) == []
    # The coordinator's own names (engines that report nothing): a chain too, but no blake2b.
    prompt = tokens(1, 64)
    own = namer.names(prompt, -16)
    assert len(own) == 4 and own[:2] == namer.names(prompt[:40], -16)
    assert not set(own) & set(block_hashes(prompt, 16))
    assert namer.names(prompt[:16] + [0] * 48, -16)[1:] != own[1:]


def test_the_longest_cached_prefix_wins():
    policy = policy_of(block_size=4)
    shared, tail_a, tail_b = tokens(1, 8), tokens(2, 8), tokens(3, 8)
    assert route(policy, 0, shared + tail_a) == A  # nothing cached: least loaded (A first)
    assert route(policy, 1, shared) == B  # B gets the first blocks too (A is busier)
    for request_id, engine in ((0, A), (1, B)):
        policy.on_finish(engine, request_id, 0)
    assert policy.loads() == {A: 0, B: 0, C: 0}
    # A holds 4 blocks of this prompt, B 2: A, although least loaded would say C.
    assert route(policy, 2, shared + tail_a + tail_b) == A
    policy.on_finish(A, 2, 0)
    # Only the shared part: A and B both hold it; the least loaded of them, the first one.
    assert route(policy, 3, shared + tail_b[:3]) == A
    assert route(policy, 4, shared + tail_b[:3]) == B  # A holds request 3 now
    # A prompt shorter than one block has no name: least loaded.
    assert route(policy, 5, shared[:3]) == C


def test_the_load_factor_overrides_affinity():
    prompt = tokens(4, 16)
    for factor, expected in ((1.5, B), (100.0, A)):
        policy = policy_of((A, B), load_factor=factor, block_size=4)
        assert route(policy, 0, prompt, 200) == A
        assert policy.loads() == {A: 216, B: 0}
        # A holds the prefix, but 216 + 20 > 1.5 x (0 + 20): load wins, unless factor is 100.
        assert route(policy, 1, prompt + [1, 2, 3, 4]) == expected


def test_exact_index_follows_stored_evicted_and_reset_events():
    policy = policy_of((A, B), info=OURS, load_factor=100.0)
    names = block_hashes(tokens(8, 16), 4)
    assert route(policy, 0, tokens(9, 4)) == A
    policy.on_finish(A, 0, 0)
    policy.on_load_report(B, {"kv_blocks_stored": names})
    assert route(policy, 1, tokens(8, 16)) == B  # B reported the blocks (A is next by load)
    policy.on_finish(B, 1, 0)
    policy.on_load_report(B, {"kv_blocks_evicted": names[2:] + [-1, "x"]})  # bad names ignored
    assert policy.holds(B) == 2 and policy.holds(A) == 1
    assert route(policy, 2, tokens(8, 8) + tokens(10, 8)) == B  # 2 blocks still on B
    policy.on_finish(B, 2, 0)
    assert route(policy, 3, tokens(8, 16)) == B  # B's blocks 3, 4: its own decision just now
    policy.on_finish(B, 3, 0)
    # A snapshot replaces all that was known of B: only these names now.
    other = block_hashes(tokens(11, 8), 4)
    policy.on_load_report(B, {"kv_blocks_reset": True, "kv_blocks_stored": other})
    assert policy.holds(B) == len(other)
    assert route(policy, 4, tokens(11, 8)) == B
    policy.on_finish(B, 4, 0)
    assert route(policy, 5, tokens(9, 4)) == A  # A's block of request 0
    policy.on_finish(A, 5, 0)
    policy.on_load_report(A, {"kv_blocks_reset": True, "kv_blocks_stored": []})
    assert policy.holds(A) == 0 and policy.holds(B) == len(other)


def test_a_snapshot_keeps_the_blocks_of_requests_still_running():
    policy = policy_of((A, B), info=OURS)
    prompt = tokens(16, 12)
    assert route(policy, 0, prompt) == A
    # A replica's first report (a snapshot) taken before it stored request 0's blocks.
    policy.on_load_report(A, {"kv_blocks_reset": True, "kv_blocks_stored": []})
    assert policy.holds(A) == 3
    policy.on_finish(A, 0, 0)  # its blocks are in every later snapshot
    policy.on_load_report(A, {"kv_blocks_reset": True, "kv_blocks_stored": []})
    assert policy.holds(A) == 0
    engine = route(policy, 1, prompt)
    other = B if engine == A else A
    policy.on_resubmit(engine, other, 1)  # its engine died with it: it starts over elsewhere
    policy.on_load_report(engine, {"kv_blocks_reset": True, "kv_blocks_stored": []})
    policy.on_load_report(other, {"kv_blocks_reset": True, "kv_blocks_stored": []})
    assert policy.holds(engine) == policy.holds(other) == 0


def test_a_removed_engine_loses_its_entries_and_rejoins_empty():
    policy = policy_of((A, B), info=OURS)
    prompt = tokens(12, 16)
    assert route(policy, 0, prompt) == A
    policy.on_finish(A, 0, 0)
    assert policy.holds(A) == 4
    policy.remove_engine(A)  # dead
    assert len(policy.index) == 0
    assert route(policy, 1, prompt) == B
    policy.on_finish(B, 1, 0)
    policy.add_engine(A)  # back (a restarted replica: its cache is empty)
    assert policy.holds(A) == 0 and policy.holds(B) == 4
    assert route(policy, 2, prompt) == B  # B, not A, although both are idle


def test_approximate_index_for_engines_that_report_nothing():
    megatron = policy_of((A, B), block_size=4, load_factor=100.0)  # no REGISTER fields
    prompt = tokens(13, 12)
    assert route(megatron, 0, prompt) == A
    megatron.on_load_report(A, {"kv_blocks_reset": True, "kv_blocks_stored": []})  # ignored
    assert megatron.holds(A) == 3
    megatron.on_finish(A, 0, 0)
    assert route(megatron, 1, prompt) == A  # its own decision says A
    megatron.on_load_report(A, {"kv_blocks_stored": block_hashes(tokens(14, 8), 4)})
    assert route(megatron, 2, tokens(14, 8)) == B  # A's report was not believed: least loaded

    default = policy_of((A, B))  # Megatron's default block size: 256 tokens
    assert route(default, 0, tokens(15, 255)) == A and default.holds(A) == 0
    assert route(default, 1, tokens(15, 512)) == B and default.holds(B) == 2

    uncached = policy_of((A, B), info={"kv_block_size": 4, "prefix_caching": False})
    assert route(uncached, 0, prompt) == A
    uncached.on_finish(A, 0, 0)
    uncached.on_load_report(A, {"kv_blocks_stored": block_hashes(prompt, 4)})
    assert len(uncached.index) == 0
    assert route(uncached, 1, prompt) == B  # no cache anywhere: least loaded's rotation


def _workload(seed: int, count: int) -> list[list[int]]:
    """Multi-turn-like prompts: shared system prompts, conversations growing turn by turn."""
    rng = random.Random(seed)
    systems = [tokens(100 + i, 16) for i in range(3)]
    conversations: list[list[int]] = []
    prompts = []
    for _ in range(count):
        if not conversations or rng.random() < 0.3:
            conversations.append(list(rng.choice(systems)))
        conversation = rng.choice(conversations)
        conversation += tokens(rng.randrange(10**6), rng.randrange(1, 12))
        prompts.append(list(conversation))
    return prompts


def test_deterministic_mode_is_a_function_of_the_request_sequence():
    prompts = _workload(1, 200)
    runs = []
    for noise in (0, 1):
        policy = policy_of((A, B, C), info=OURS, deterministic=True)
        rng = random.Random(noise)
        chosen = []
        for request_id, prompt in enumerate(prompts):
            engine = route(policy, request_id, prompt, 8)
            chosen.append(engine)
            if noise:  # timing-dependent events that must not change the choice
                policy.on_tokens(engine, request_id, 3)
                policy.on_finish(engine, request_id, 8)
                report = {"processed_tokens": rng.randrange(10**4)}
                report.update(kv_blocks_reset=True, kv_blocks_stored=[rng.getrandbits(64)])
                policy.on_load_report(rng.choice((A, B, C)), report)
        runs.append(chosen)
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3  # it did route by load and prefix, not to one engine
    hits = sum(1 for a, b in zip(runs[0], runs[0][1:], strict=False) if a == b)
    assert hits > 0


def test_equal_to_least_loaded_when_nothing_matches():
    rng = random.Random(2)
    prefix_aware, least_loaded = policy_of(info=OURS), LeastLoaded([A, B, C])
    held: list[tuple[bytes, int]] = []
    for request_id in range(300):
        prompt = tokens(10**6 + request_id, rng.randrange(1, 40))  # distinct first blocks
        budget = rng.randrange(50)
        ours = route(prefix_aware, request_id, prompt, budget)
        assert ours == route(least_loaded, request_id, prompt, budget)
        held.append((ours, request_id))
        if rng.random() < 0.5:
            engine, finished = held.pop(rng.randrange(len(held)))
            generated = rng.randrange(50)
            for policy in (prefix_aware, least_loaded):
                policy.on_finish(engine, finished, generated)
        if rng.random() < 0.1:
            report = {"processed_tokens": request_id * 10}
            for policy in (prefix_aware, least_loaded):
                policy.on_load_report(A, report)
    assert prefix_aware.loads() == least_loaded.loads()
    assert len(prefix_aware.index) > 0  # blocks were indexed: they just never matched


def test_index_keeps_the_most_recent_names_within_its_bound():
    index = PrefixIndex(capacity=100)
    index.store(range(1000), 1)
    assert 50 <= len(index) <= 100
    assert all(index.holders(name) == 1 for name in range(950, 1000))  # the last half kept
    assert index.holders(0) == 0
    index.store([950], 2)  # adds the engine
    index.store(range(2000, 2040), 1)
    assert index.holders(950) == 3 and index.holders(951) == 1  # within the last 50 touches
    index.store([950], 2)  # a touch keeps 950 young
    index.store(range(2040, 2060), 1)
    assert index.holders(950) == 3 and index.holders(951) == 0 and len(index) <= 100
    index.evict([950], 1)
    assert index.holders(950) == 2
    index.drop(2)
    assert index.holders(950) == 0
    with pytest.raises(ValueError):
        PrefixIndex(capacity=1)


def test_a_million_blocks_fit_in_under_100_mib():
    rng = random.Random(3)
    tracemalloc.start()  # the names too: the index owns the ints of reports and hashing
    try:
        index = PrefixIndex()  # the default bound
        for batch in range(1000):
            index.store([rng.getrandbits(64) for _ in range(1000)], 1 << batch % 5)
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == 1_000_000 == index.capacity
    rng = random.Random(3)
    assert all(index.holders(rng.getrandbits(64)) for _ in range(1_000_000))
    assert size < 100 * 2**20, f"{size / 2**20:.1f} MiB for {len(index)} blocks"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="prefix_load_factor"):
        policy_of(load_factor=0.5)
    with pytest.raises(ValueError, match="prefix_block_size"):
        policy_of(block_size=0)
    with pytest.raises(ValueError, match="prefix_index_blocks"):
        policy_of(index_blocks=1)
