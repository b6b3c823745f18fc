"""Routing at hundreds of engines: the min-tree choice equals the old linear scan's, always.

The reference scan below is the policy's choice before the min-tree (kept here, not in the
package): the least load, ties to the first engine after the last pick, stopping at an idle
one. Both policies see the same random sequence of submits, streamed tokens, finishes, load
reports, tokenized prompts, fail-overs, engines leaving and joining; every choice must agree.
"""

from __future__ import annotations

import random

import pytest

from megatron_coord.coordinator.routing import LeastLoaded, RoundRobin


class ScanLeastLoaded(LeastLoaded):
    """LeastLoaded choosing by the linear scan it used before (the reference)."""

    def choose(self, request=None) -> bytes:
        engines = self.engines
        count = len(engines)
        if not count:
            raise LookupError("no engine is registered")
        own, reported, seen = self._load, self._reported, self._seen
        index = self._next if self._next < count else 0
        best_index, best = index, None
        for _ in range(count):
            engine = engines[index]
            load = own[engine]
            unseen = reported[engine] - seen[engine]
            if unseen > 0:
                load -= unseen
            if best is None or load < best:
                best, best_index = load, index
                if load <= 0:
                    break
            index += 1
            if index == count:
                index = 0
        self._next = best_index + 1
        return engines[best_index]


def _engine(n: int) -> bytes:
    return b"engine-%d" % n


def _drive(policies: list[LeastLoaded], steps: int, seed: int, engines: int) -> int:
    """Apply one random operation sequence to every policy; assert equal choices. Returns
    how many choices were compared."""
    rng = random.Random(seed)
    inflight: dict[int, bytes] = {}
    next_id, next_engine, compared = 0, engines, 0
    processed = {_engine(i): 0 for i in range(engines)}
    for _ in range(steps):
        op = rng.random()
        live = policies[0].engines
        if op < 0.45 and live:
            picks = {p.choose() for p in policies}
            assert len(picks) == 1, picks
            engine = picks.pop()
            compared += 1
            text = rng.random() < 0.3
            prompt = "x" * rng.randint(1, 400) if text else [1] * rng.randint(1, 100)
            budget = rng.choice([0, 1, 16, 64, 300])
            tokenized = text and rng.random() < 0.8
            for p in policies:
                p.on_submit(engine, next_id, prompt, budget)
                if tokenized:
                    p.on_prompt_tokens(next_id, len(prompt) // 3 + 1)
            inflight[next_id] = engine
            next_id += 1
        elif op < 0.62 and inflight:
            request_id = rng.choice(list(inflight))
            count = rng.randint(1, 8)
            for p in policies:
                p.on_tokens(inflight[request_id], request_id, count)
        elif op < 0.85 and inflight:
            request_id = rng.choice(list(inflight))
            generated = rng.choice([None, rng.randint(0, 320)])
            engine = inflight.pop(request_id)
            for p in policies:
                p.on_finish(engine, request_id, generated)
        elif op < 0.93 and live:
            engine = rng.choice(list(live))
            processed[engine] += rng.randint(0, 200)
            for p in policies:
                p.on_load_report(engine, {"processed_tokens": processed[engine]})
        elif op < 0.95 and inflight and len(live) > 1:
            request_id = rng.choice(list(inflight))
            new = policies[0].choose()
            for p in policies[1:]:
                assert p.choose() == new
            for p in policies:
                p.on_resubmit(inflight[request_id], new, request_id)
            inflight[request_id] = new
        elif op < 0.975 and len(live) > 1:
            engine = rng.choice(list(live))
            for p in policies:
                p.remove_engine(engine)
            for request_id in [r for r, e in inflight.items() if e == engine]:
                del inflight[request_id]  # failed: the policies' on_finish is ignored
                for p in policies:
                    p.on_finish(engine, request_id)
        else:
            engine = _engine(next_engine)
            next_engine += 1
            processed[engine] = rng.randint(0, 1000)
            for p in policies:
                p.add_engine(engine)
        if compared % 64 == 0:
            assert policies[0].loads() == policies[1].loads()
    return compared


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_choice_at_256_engines_equals_the_linear_scan(seed: int) -> None:
    engines = [_engine(i) for i in range(256)]
    compared = _drive([LeastLoaded(engines), ScanLeastLoaded(engines)], 6000, seed, 256)
    assert compared > 2000


def test_choice_with_churn_and_few_engines_equals_the_linear_scan() -> None:
    """Joins and leaves renumber the tree's slots (compaction): the rotation must survive."""
    engines = [_engine(i) for i in range(4)]
    compared = _drive([LeastLoaded(engines), ScanLeastLoaded(engines)], 8000, 7, 4)
    assert compared > 2000


def test_deterministic_choice_equals_the_linear_scan() -> None:
    engines = [_engine(i) for i in range(256)]
    new = LeastLoaded(engines, deterministic=True)
    old = ScanLeastLoaded(engines, deterministic=True)
    assert _drive([new, old], 4000, 11, 256) > 1000


def test_idle_engines_rotate_and_a_loaded_one_is_skipped() -> None:
    engines = [_engine(i) for i in range(256)]
    policy = LeastLoaded(engines)
    policy.on_submit(engines[1], 0, [1] * 10, 10)
    picks = [policy.choose() for _ in range(256)]
    assert engines[1] not in picks[:255]
    assert picks[:3] == [engines[0], engines[2], engines[3]]


def test_membership_of_routable_engines_is_a_set_lookup() -> None:
    policy = RoundRobin([_engine(i) for i in range(300)])
    assert _engine(299) in policy.engines and _engine(300) not in policy.engines
    policy.remove_engine(_engine(5))
    assert _engine(5) not in policy.engines and len(policy.engines) == 299
    assert policy.engines._members == set(policy.engines)


class _CountingDict(dict):
    """A last-seen map that counts passes over it (iterating its values or items)."""

    passes = 0

    def values(self):
        return _Counted(super().values())

    def items(self):
        return _Counted(super().items())


class _Counted:
    def __init__(self, view) -> None:
        self.view = view

    def __iter__(self):
        _CountingDict.passes += 1
        return iter(self.view)


def test_silence_checks_scan_the_engines_only_once_per_timeout() -> None:
    from megatron_coord.coordinator.liveness import SilenceClock

    clock = SilenceClock(3.0)
    last_seen = _CountingDict({_engine(i): 100.0 for i in range(256)})
    assert clock.next_deadline(last_seen.values()) == 103.0
    _CountingDict.passes = 0
    for step in range(1000):  # 1000 wake-ups within the timeout: no pass at all
        now = 100.0 + step * 0.002
        last_seen[_engine(step % 255)] = now  # engine 255 stays silent
        assert clock.silent(last_seen, now) == []
        assert clock.next_deadline(last_seen.values()) == 103.0
    assert _CountingDict.passes == 0
    # Past the bound: one pass finds who is really silent (engine 255 was heard last at 100.0).
    silent = clock.silent(last_seen, 103.5)
    assert _engine(255) in silent and _engine(0) not in silent
    assert _CountingDict.passes == 2
