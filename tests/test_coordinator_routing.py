"""The routing policy interface and its round-robin policy."""

from __future__ import annotations

from collections import deque

import pytest

from megatron_coord.coordinator.routing import RoundRobin, RoutingPolicy, make_policy


def test_round_robin_cycles_in_order():
    policy = make_policy("round_robin", deque([b"a", b"b", b"c"]))
    assert [policy.choose() for _ in range(7)] == [b"a", b"b", b"c", b"a", b"b", b"c", b"a"]


def test_round_robin_follows_engines_added_and_removed():
    policy = RoundRobin([b"a", b"b", b"c"])
    assert policy.choose() == b"a"
    policy.remove_engine(b"a")  # the next pick is still the engine after the removed one
    assert [policy.choose() for _ in range(3)] == [b"b", b"c", b"b"]
    policy.add_engine(b"d")
    assert [policy.choose() for _ in range(3)] == [b"c", b"d", b"b"]
    policy.remove_engine(b"d")
    policy.remove_engine(b"b")
    assert [policy.choose() for _ in range(2)] == [b"c", b"c"]


def test_no_engine_and_bad_names_are_clear_errors():
    with pytest.raises(LookupError, match="no engine"):
        RoundRobin().choose()
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest", [b"a"])
    with pytest.raises(ValueError, match="already routed"):
        RoundRobin([b"a", b"a"])


def test_base_policy_hooks_are_optional():
    policy = RoutingPolicy([b"a"])
    assert policy.tracks_load is False
    policy.on_submit(b"a", 1)
    policy.on_finish(b"a", 1)
    with pytest.raises(NotImplementedError):
        policy.choose()
