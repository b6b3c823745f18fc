"""``POST /v1/admin/update_weights`` and the weight-update metrics, against a real coordinator
with two fake engines (which apply any update at once): behind the API key (401 without it),
a published update answered 200 with the coordinator's result, a bad body 400 naming the
field, a spec the coordinator refuses in its state 409, a failed update 409 naming the replicas; ``/metrics`` shows the
published version, each replica's and the rounds by outcome."""

from __future__ import annotations

import httpx
from conftest import Peer, start_coordinator, wait_stats

from megatron_coord.serving import HTTPServerThread
from megatron_coord.testing.fake_engine import ByteTokenizer, spawn

KEY = "admin-key"
CKPT = {"kind": "checkpoint", "path": "/ckpt"}


def test_admin_update_weights_behind_the_key_and_in_metrics():
    address, process, ready = start_coordinator(2)
    engines = [spawn(address, rank) for rank in range(2)]
    server = None
    try:
        assert ready.wait(60)
        server = HTTPServerThread(address, ByteTokenizer(), "m", api_key=KEY).start()
        url = f"{server.url}/v1/admin/update_weights"
        auth = {"Authorization": f"Bearer {KEY}"}
        spec = {"version": "v2", "source": CKPT, "mode": "recompute"}
        with httpx.Client(timeout=30) as http:
            refused = http.post(url, json=spec)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_api_key"
            wrong = http.post(url, json=spec, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401

            done = http.post(url, json=spec, headers=auth)
            assert done.status_code == 200, done.text
            body = done.json()
            assert body["published"] and body["version"] == "v2" and body["failed"] == []
            assert sorted(r["data_parallel_rank"] for r in body["replicas"]) == [0, 1]

            for bad, field in (
                ({**spec, "mode": "retract"}, "mode"),
                ({**spec, "timeout_s": 0}, "timeout_s"),
                ({**spec, "extra": 1}, "extra"),
                ({"version": "v3", "source": {"kind": "checkpoint"}}, "source"),
                ({"version": "", "source": CKPT}, "version"),
            ):
                answer = http.post(url, json=bad, headers=auth)
                assert answer.status_code == 400, (bad, answer.text)
                assert field in answer.text
            unknown = {**spec, "version": "v3", "abort_older_than": "v9"}
            answer = http.post(url, json=unknown, headers=auth)  # refused by the coordinator
            assert answer.status_code == 409 and "'v9'" in answer.json()["error"]["message"]

            metrics = http.get(f"{server.url}/metrics").text
            assert 'megatron_coord_weight_version_info{version="v2"} 1.0' in metrics
            assert 'megatron_coord_weight_updates_total{outcome="published"} 1.0' in metrics
            for rank in (0, 1):
                line = f'replica_weight_version_info{{data_parallel_rank="{rank}",version="v2"}}'
                assert line in metrics

        # A replica that fails: 409, the failed replica named, nothing published.
        watcher = Peer(address).connect_ours()
        engines[1].kill()
        engines[1].wait()
        wait_stats(watcher, lambda s: len(s["engines"]) == 1, "the killed engine gone")
        own = Peer(address)  # takes its place
        own.send(101, {"data_parallel_rank": 1, "protocol": 1, "weight_version": "v2"})
        wait_stats(watcher, lambda s: len(s["engines"]) == 2, "the raw engine registered")
        watcher.close()
        with httpx.Client(timeout=30) as http:
            answer = _post_while(http, url, {**spec, "version": "v4"}, auth, own)
            assert answer.status_code == 409, answer.text
            failure = answer.json()
            assert failure["error"]["code"] == "update_failed"
            assert failure["update"]["failed"] and "dp rank 1" in failure["error"]["message"]
            assert "out of memory" in failure["error"]["message"]
            metrics = http.get(f"{server.url}/metrics").text
            assert 'megatron_coord_weight_version_info{version="v2"} 1.0' in metrics
            assert 'megatron_coord_weight_updates_total{outcome="failed"} 1.0' in metrics
        own.close()
    finally:
        if server is not None:
            server.stop()
        for engine in engines:
            if engine.poll() is None:
                engine.kill()
            engine.wait()
        process.kill()
        process.join()


def _post_while(http, url, spec, auth, engine: Peer) -> httpx.Response:
    """POST the update from a thread while ``engine`` (a raw replica) refuses it."""
    import threading

    answers: list = []
    thread = threading.Thread(
        target=lambda: answers.append(http.post(url, json=spec, headers=auth))
    )
    thread.start()
    message = engine.recv()
    while message[0] != 106:
        message = engine.recv()
    result = {"ok": False, "version": "v2", "error": "out of memory", "duration_s": 0.1}
    engine.send(107, message[1], result)
    thread.join(30)
    return answers[0]
