"""The standalone coordinator process (python -m megatron_coord.coordinator): engines join it,
and SIGTERM/SIGINT shut it down gracefully: new requests are refused with shutting_down, those
in flight finish within the grace period or fail with shutting_down (and are aborted on their
engine), then it exits 0."""

from __future__ import annotations

import signal

import pytest
from conftest import Peer, register, wait_stats

from megatron_coord.testing.fault_harness import StandaloneCoordinator

PARAMS = {"num_tokens_to_generate": 1}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_in_flight_requests_finish_then_fails_the_rest(checkpoint, signum):
    coordinator = StandaloneCoordinator(checkpoint, "--shutdown-grace", "1.0")
    try:
        client = Peer(coordinator.address).connect_ours()
        engine = register(coordinator.address, 0)
        wait_stats(client, lambda s: len(s["engines"]) == 1, "engine joined")
        client.send(3, "finishes", [1, 2], PARAMS)
        client.send(3, "too-slow", [3, 4], PARAMS)
        held = [engine.recv()[1] for _ in range(2)]
        coordinator.signal(signum)
        wait_stats(client, lambda s: s["shutting_down"], "shutdown began")
        client.send(3, "new", [5], PARAMS)
        assert client.recv()[:3] == [100, "new", "shutting_down"]
        record = {"request_id": held[0], "prompt_tokens": [1, 2], "generated_tokens": [9]}
        engine.send(4, [{"requests": [record]}])
        assert client.recv()[:2] == [4, "finishes"]
        reply = client.recv()  # after the 1 s grace
        assert reply[:3] == [100, "too-slow", "shutting_down"]
        assert engine.recv() == [104, held[1]]
        assert coordinator.wait(30) == 0
    finally:
        coordinator.kill()


def test_idle_standalone_exits_at_once_on_sigterm(checkpoint):
    coordinator = StandaloneCoordinator(checkpoint)
    try:
        Peer(coordinator.address).connect_ours()
        coordinator.signal(signal.SIGTERM)
        assert coordinator.wait(30) == 0  # nothing in flight: no grace period to sit out
    finally:
        coordinator.kill()
