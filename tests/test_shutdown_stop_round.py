"""A launch's own coordinator (``shutdown_stops_engines``) ends a graceful shutdown with a STOP
round, so the engines of the launch stop too; SIGHUP (its rank 0 died) ends it at once."""

from __future__ import annotations

import os
import signal
import time

from conftest import Peer, register, start_coordinator, wait_stats

PARAMS = {"num_tokens_to_generate": 1}


def _serving(**options):
    """A spawned coordinator for one engine, the registered engine and a client of ours."""
    address, process, ready = start_coordinator(
        1, shutdown_stops_engines=True, engine_timeout=60.0, **options
    )
    engine = register(address, 0)
    assert ready.wait(30)
    return process, engine, Peer(address).connect_ours()


def test_drained_coordinator_stops_its_engines_then_exits():
    process, engine, client = _serving(shutdown_grace=30.0)
    try:
        client.send(3, "in-flight", [1, 2], PARAMS)
        request_id = engine.recv()[1]
        os.kill(process.pid, signal.SIGTERM)
        wait_stats(client, lambda s: s["shutting_down"], "shutdown began")
        assert engine.poll(300) is False  # draining: no STOP while a request is in flight
        record = {"request_id": request_id, "prompt_tokens": [1, 2], "generated_tokens": [7]}
        engine.send(4, [{"requests": [record]}])
        assert client.recv()[:2] == [4, "in-flight"]
        assert engine.recv() == [10]  # drained: STOP
        engine.send(11)
        assert engine.recv() == [11]  # every engine acked: STOP_ACK, and the coordinator exits
        process.join(10)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
        process.join()


def test_stop_round_gives_up_on_an_engine_that_never_acks():
    process, engine, client = _serving(shutdown_grace=0.0)
    try:
        os.kill(process.pid, signal.SIGTERM)
        assert engine.recv() == [10]
        started = time.monotonic()
        process.join(15)  # STOP_ROUND_S (5 s), not forever
        assert process.exitcode == 0
        assert 4.0 < time.monotonic() - started < 10.0
    finally:
        if process.is_alive():
            process.kill()
        process.join()


def test_sighup_fails_what_is_in_flight_at_once_without_a_stop_round():
    process, engine, client = _serving(shutdown_grace=30.0)
    try:
        client.send(3, "in-flight", [1, 2], PARAMS)
        request_id = engine.recv()[1]
        started = time.monotonic()
        os.kill(process.pid, signal.SIGHUP)
        assert client.recv()[:3] == [100, "in-flight", "shutting_down"]
        assert engine.recv() == [104, request_id]  # aborted on its engine; no STOP follows
        process.join(10)
        assert process.exitcode == 0
        assert time.monotonic() - started < 3.0  # not the 30 s grace
        assert engine.poll(0) is False
    finally:
        if process.is_alive():
            process.kill()
        process.join()
