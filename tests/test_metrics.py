"""ServingMetrics: its own registry, fixed outcome labels, and gauges refreshed from STATS."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from megatron_coord.serving.metrics import OUTCOMES, ServingMetrics


def scrape(metrics: ServingMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_outcome_reads_zero_before_any_request() -> None:
    samples = scrape(ServingMetrics())
    for endpoint in ("completions", "chat_completions"):
        for outcome in OUTCOMES:
            key = ("megatron_coord_requests_total", (("endpoint", endpoint), ("outcome", outcome)))
            assert samples[key] == 0


def test_success_records_latency_and_tokens() -> None:
    m = ServingMetrics()
    m.observe_success("completions", 0.2, prompt_tokens=5, generated_tokens=7)
    m.observe_success("completions", 3.0, prompt_tokens=1, generated_tokens=2)
    m.observe_ttft("completions", 0.004)
    m.observe_outcome("chat_completions", "overloaded")
    s = scrape(m)
    ep = (("endpoint", "completions"),)
    assert s[("megatron_coord_requests_total", ep + (("outcome", "success"),))] == 2
    assert s[("megatron_coord_prompt_tokens_total", ep)] == 6
    assert s[("megatron_coord_generation_tokens_total", ep)] == 9
    assert s[("megatron_coord_request_latency_seconds_count", ep)] == 2
    assert s[("megatron_coord_request_latency_seconds_sum", ep)] == pytest.approx(3.2)
    assert s[("megatron_coord_request_latency_seconds_bucket", ep + (("le", "0.25"),))] == 1
    assert s[("megatron_coord_request_latency_seconds_bucket", ep + (("le", "5.0"),))] == 2
    assert s[("megatron_coord_time_to_first_token_seconds_bucket", ep + (("le", "0.005"),))] == 1
    chat = (("endpoint", "chat_completions"), ("outcome", "overloaded"))
    assert s[("megatron_coord_requests_total", chat)] == 1


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown outcome"):
        ServingMetrics().observe_outcome("completions", "fine")


def test_registries_are_independent() -> None:
    a, b = ServingMetrics(), ServingMetrics()
    a.observe_outcome("completions", "error")
    key = ("megatron_coord_requests_total", (("endpoint", "completions"), ("outcome", "error")))
    assert scrape(a)[key] == 1
    assert scrape(b)[key] == 0


def test_replica_gauges_follow_stats() -> None:
    m = ServingMetrics()
    m.update_from_stats(
        {
            "engines": [
                {"data_parallel_rank": 0, "alive": True, "outstanding_requests": 3},
                {
                    "data_parallel_rank": 1,
                    "alive": False,
                    "outstanding_requests": 0,
                    "outstanding_tokens": 40,
                },
            ],
            "requests_in_flight": 3,
            "clients": 2,
        }
    )
    s = scrape(m)
    assert s[("megatron_coord_coordinator_up", ())] == 1
    assert s[("megatron_coord_replicas_alive", ())] == 1
    assert s[("megatron_coord_coordinator_requests_in_flight", ())] == 3
    assert s[("megatron_coord_coordinator_clients", ())] == 2
    assert s[("megatron_coord_replica_up", (("data_parallel_rank", "0"),))] == 1
    assert s[("megatron_coord_replica_up", (("data_parallel_rank", "1"),))] == 0
    assert s[("megatron_coord_replica_queue_depth", (("data_parallel_rank", "0"),))] == 3
    assert s[("megatron_coord_replica_outstanding_tokens", (("data_parallel_rank", "1"),))] == 40
    # Not reported for rank 0: absent rather than a made-up zero.
    assert ("megatron_coord_replica_outstanding_tokens", (("data_parallel_rank", "0"),)) not in s

    # A replica that left the coordinator's view leaves the scrape too.
    m.update_from_stats({"engines": [{"data_parallel_rank": 0, "alive": True}]})
    s = scrape(m)
    assert ("megatron_coord_replica_up", (("data_parallel_rank", "1"),)) not in s
    assert s[("megatron_coord_replicas_alive", ())] == 1


def test_no_stats_reads_as_everything_down() -> None:
    m = ServingMetrics()
    m.update_from_stats({"engines": [{"data_parallel_rank": 0, "alive": True}]})
    m.update_from_stats(None)
    s = scrape(m)
    assert s[("megatron_coord_coordinator_up", ())] == 0
    assert s[("megatron_coord_replicas_alive", ())] == 0
    assert s[("megatron_coord_replica_up", (("data_parallel_rank", "0"),))] == 0


def test_malformed_stats_never_raise() -> None:
    m = ServingMetrics()
    m.update_from_stats(
        {
            "engines": [
                "not a dict",
                {"alive": "yes", "outstanding_requests": "many", "outstanding_tokens": True},
                {"data_parallel_rank": 7, "alive": 1, "outstanding_requests": None},
            ],
            "requests_in_flight": "x",
            "clients": None,
        }
    )
    s = scrape(m)
    # Only a literal True counts as alive; junk numbers read as 0; a missing rank uses the index.
    assert s[("megatron_coord_replicas_alive", ())] == 0
    assert s[("megatron_coord_replica_up", (("data_parallel_rank", "1"),))] == 0
    assert s[("megatron_coord_replica_queue_depth", (("data_parallel_rank", "7"),))] == 0
    assert s[("megatron_coord_coordinator_requests_in_flight", ())] == 0


def test_engine_load_reports_become_replica_gauges() -> None:
    m = ServingMetrics()
    load = {"queued": 4, "active": 2, "free_kv_tokens": 512, "paused": True, "extra": "x"}
    m.update_from_stats(
        {
            "engines": [
                {"data_parallel_rank": 0, "alive": True, "load": load},
                {"data_parallel_rank": 1, "alive": True, "load": None},
            ]
        }
    )
    s = scrape(m)
    r0 = (("data_parallel_rank", "0"),)
    assert s[("megatron_coord_replica_engine_queued", r0)] == 4
    assert s[("megatron_coord_replica_engine_active", r0)] == 2
    assert s[("megatron_coord_replica_engine_free_kv_tokens", r0)] == 512
    assert s[("megatron_coord_replica_engine_paused", r0)] == 1
    # Not reported: no sample (rank 1 sent no heartbeat yet; rank 0 reported no steps).
    assert ("megatron_coord_replica_engine_queued", (("data_parallel_rank", "1"),)) not in s
    assert ("megatron_coord_replica_engine_steps", r0) not in s
