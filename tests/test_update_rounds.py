"""Weight-update rounds in the coordinator, frame by frame: the spec checked at the edge
(update_spec.py), then a coordinator in a thread with raw engines of ours: ranks in the
transfer group, publication all or nothing, the staleness bound, one round at a time, a replica
that refuses, dies or never answers named in the result, routing only to replicas of the
published version, Megatron engines refused, and the prefix index forgetting a replica's
blocks when its weights change."""

from __future__ import annotations

import pytest
from conftest import Peer, ThreadedCoordinator, query_stats, stop_with_raw_engines

from megatron_coord.coordinator.routing.prefix_aware import PrefixAware
from megatron_coord.coordinator.update_spec import checked_spec
from megatron_coord.protocol import ProtocolError

DIST = {
    "kind": "distributed",
    "store_host": "127.0.0.1",
    "store_port": 29999,
    "trainer_ranks": 1,
    "bucket_bytes": 1 << 20,
    "backend": "gloo",
}
CKPT = {"kind": "checkpoint", "path": "/ckpt"}
PARAMS = {"num_tokens_to_generate": 2}


def test_a_good_spec_gets_its_defaults():
    spec = checked_spec({"version": "v2", "source": DIST})
    assert spec == {
        "version": "v2",
        "source": DIST,
        "mode": "keep",
        "abort_older_than": None,
        "timeout_s": 300.0,
    }
    assert checked_spec({"version": "x", "source": {"kind": "in_place"}, "mode": "abort"})


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("v2", "must be a map"),
        ({"source": CKPT}, "version must be a string"),
        ({"version": "", "source": CKPT}, "version must be a string"),
        ({"version": "v" * 129, "source": CKPT}, "1 to 128"),
        ({"version": 3, "source": CKPT}, "version"),
        ({"version": "v", "source": CKPT, "mdoe": "keep"}, "unknown field(s) mdoe"),
        ({"version": "v", "source": {"kind": "s3"}}, "source kind"),
        ({"version": "v", "source": {"kind": "checkpoint"}}, "needs a path"),
        ({"version": "v", "source": {**CKPT, "x": 1}}, "unknown field(s) x"),
        ({"version": "v", "source": {**DIST, "store_port": 70000}}, "store_port"),
        ({"version": "v", "source": {**DIST, "store_port": True}}, "store_port"),
        ({"version": "v", "source": {**DIST, "trainer_ranks": 0}}, "trainer_ranks"),
        ({"version": "v", "source": {**DIST, "bucket_bytes": 1 << 63}}, "bucket_bytes"),
        ({"version": "v", "source": {**DIST, "backend": "mpi"}}, "backend"),
        ({"version": "v", "source": {**DIST, "store_host": ""}}, "store_host"),
        ({"version": "v", "source": CKPT, "mode": "retract"}, "mode must be one of"),
        ({"version": "v", "source": CKPT, "abort_older_than": 7}, "abort_older_than"),
        ({"version": "v", "source": CKPT, "timeout_s": 0}, "timeout_s"),
        ({"version": "v", "source": CKPT, "timeout_s": float("nan")}, "timeout_s"),
        ({"version": "v", "source": CKPT, "timeout_s": 1e9}, "timeout_s"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(spec, says):
    with pytest.raises(ProtocolError) as caught:
        checked_spec(spec)
    assert caught.value.code.value == "invalid_request"
    assert says in str(caught.value)


def _engine(address: str, rank: int) -> Peer:
    engine = Peer(address)
    info = {"data_parallel_rank": rank, "protocol": 1, "weight_version": "v1"}
    engine.send(101, {**info, "tensor_parallel_size": 2})
    return engine


def _done(engine: Peer, ok: bool, version: str, error: str | None = None) -> dict:
    """Answer the UPDATE_WEIGHTS this engine got; the spec it was sent."""
    header, update_id, spec = engine.recv()
    assert header == 106
    result = {"ok": ok, "version": version, "error": error, "duration_s": 0.01}
    engine.send(107, update_id, {**result, "aborted": 0, "recomputed": 0, "weight_bytes": 8})
    return spec


def _answer(client: Peer, header: int = 107) -> list:
    message = client.recv()
    while message[0] != header:  # replies of requests may come first
        message = client.recv()
    return message


def test_rounds_publish_all_or_nothing_and_route_to_the_published_version():
    coord = ThreadedCoordinator(2)
    engines = [_engine(coord.address, rank) for rank in (0, 1)]
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    try:
        # 1. From a trainer: every replica told its ranks, the client the group; published.
        client.send(106, "u1", {"version": "v2", "source": DIST, "mode": "recompute"})
        ready = client.recv()
        assert ready[:2] == [108, "u1"]
        assert ready[2]["world_size"] == 5 and ready[2]["trainer_ranks"] == [0]
        assert [r["first_rank"] for r in ready[2]["replicas"]] == [1, 3]
        specs = [_done(engine, True, "v2") for engine in engines]
        assert [(s["first_rank"], s["world_size"]) for s in specs] == [(1, 5), (3, 5)]
        assert all(s["stale_versions"] == [] and s["mode"] == "recompute" for s in specs)
        done = _answer(client)[2]
        assert done["published"] and done["failed"] == [] and done["error"] is None
        assert [r["data_parallel_rank"] for r in done["replicas"]] == [0, 1]
        stats = query_stats(client)
        assert (stats["weight_version"], stats["updates_done"]) == ("v2", 1)
        assert [e["weight_version"] for e in stats["engines"]] == ["v2", "v2"]

        # 2. The staleness bound; one replica refuses: not published, named, routed around.
        spec = {"version": "v3", "source": CKPT, "abort_older_than": "v2"}
        client.send(106, "u2", spec)
        client.send(106, "u3", {"version": "v4", "source": CKPT})  # while one runs
        assert client.recv() == [100, "u3", "overloaded", _in_progress("v3")]
        assert _done(engines[0], True, "v3")["stale_versions"] == ["v1"]
        assert "first_rank" not in _done(engines[1], False, "v2", "a tensor is missing")
        done = _answer(client)[2]
        name = f"dp rank 1 ({engines_identity(coord, 1)})"
        assert not done["published"] and done["failed"] == [name]
        assert "a tensor is missing" in done["error"] and name in done["error"]
        stats = query_stats(client)
        assert (stats["weight_version"], stats["updates_failed"]) == ("v2", 1)
        for rid in range(4):  # only dp rank 1 still serves v2
            client.send(3, rid, [80], PARAMS)
        for _ in range(4):
            assert engines[1].recv()[0] == 3
        assert not engines[0].poll(200)

        # 3. A replica that dies during the round, one that never answers in time.
        client.send(106, "u4", {"version": "v5", "source": CKPT, "timeout_s": 0.5})
        _done(engines[0], True, "v5")
        assert engines[1].recv()[0] == 106  # and never answers
        done = _answer(client)[2]
        assert not done["published"] and done["failed"] == [name]
        assert "no answer within the update's timeout (0.5 s)" in done["error"]
        client.send(106, "u5", {"version": "v6", "source": CKPT})
        _done(engines[0], True, "v6")
        engines[1].close()  # dies mid-round
        done = _answer(client)[2]
        assert not done["published"] and "died during the update" in done["error"]

        # 4. Refused at the edge: an unknown staleness bound, a bad spec.
        client.send(106, "u6", {"version": "v7", "source": CKPT, "abort_older_than": "v9"})
        error = client.recv()
        assert error[:3] == [100, "u6", "invalid_request"] and "'v9'" in error[3]
        client.send(106, "u7", {"version": "v7", "source": CKPT, "mode": "x"})
        assert client.recv()[:3] == [100, "u7", "invalid_request"]
        client.send(106, "u8", "no spec")
        assert client.recv()[:3] == [100, "u8", "invalid_request"]
    finally:
        stop_with_raw_engines(coord, client, engines[:1])


def _in_progress(version: str) -> str:
    return f"an update is in progress (to {version!r}); retry once it is answered"


def engines_identity(coord: ThreadedCoordinator, rank: int) -> str:
    registry = coord.coordinator.state.registry
    (identity,) = [i for i, e in registry.engines.items() if e.data_parallel_rank == rank]
    return identity.hex()


def test_an_update_with_a_megatron_engine_registered_is_refused():
    coord = ThreadedCoordinator(2)
    ours = _engine(coord.address, 0)
    megatron = Peer(coord.address, identity=b"mp-coord-1")
    megatron.send_raw(b"")
    assert coord.ready.wait(30)
    client = Peer(coord.address).connect_ours()
    client.send(106, 1, {"version": "v2", "source": CKPT})
    header, crid, code, text = client.recv()
    assert (header, crid, code) == (100, 1, "invalid_request")
    assert "dp rank 1" in text and "Megatron-core engine" in text
    assert not ours.poll(200)  # nothing was sent to any replica
    client.send(10)
    assert ours.recv() == [10]
    ours.send(11)
    megatron.recv()  # its STOP, in its own protocol
    megatron.send_raw(b"\x91\x0b")  # STOP_ACK: [11]
    assert client.recv() == [11]
    coord.join()


def test_the_prefix_index_forgets_a_replica_whose_weights_changed():
    info = {"kv_block_size": 4, "prefix_caching": True}
    policy = PrefixAware([b"a", b"b"], engine_info=lambda engine: info)
    prompt = list(range(12))
    policy.on_submit(b"a", 1, prompt, 4)
    policy.on_submit(b"b", 2, prompt, 4)
    assert policy.holds(b"a") == policy.holds(b"b") == 3
    policy.on_version_change(b"a")
    assert policy.holds(b"a") == 0 and policy.holds(b"b") == 3
    # Its next report's snapshot does not bring back the blocks of its requests in flight.
    policy.on_load_report(b"a", {"kv_blocks_reset": True, "kv_blocks_stored": []})
    assert policy.holds(b"a") == 0
    policy.on_finish(b"a", 1, 4)  # forgotten requests end as usual
