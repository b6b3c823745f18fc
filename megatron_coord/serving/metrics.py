"""Prometheus metrics for the HTTP front end.

Every metric lives in the ``ServingMetrics`` object's own ``CollectorRegistry`` (never the
process-global default one), so two servers in one process -- as in tests -- never collide, and
``/metrics`` shows only what this server measured.

Request counters and histograms are updated as requests finish. Per-replica gauges (queue depth,
liveness) describe the coordinator's view and are refreshed from a ``STATS`` reply just before
each scrape, so they are never older than the scrape itself.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "OUTCOMES", "ServingMetrics"]

PREFIX = "megatron_coord"

# Every request ends in exactly one of these; the label set is fixed so dashboards can rely on it.
OUTCOMES = (
    "success",  # answered in full
    "invalid_request",  # 400: bad JSON, bad field, prompt the coordinator refused
    "overloaded",  # 429: the coordinator or this server refused for load
    "no_replica",  # 503: no live engine to serve it
    "aborted",  # the HTTP client went away before the answer was complete
    "timeout",  # 504: not answered within the server's request timeout (aborted)
    "error",  # 500: anything else (engine failure, bug)
)

# Latencies on 2 CPU cores run from ~1 ms (fake engine) to tens of seconds (long generations).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


# Fields of an engine's HEARTBEAT load report (relayed in STATS) exported as per-replica gauges.
# Unknown fields are ignored, missing ones leave no sample: engines differ in what they report.
LOAD_GAUGES = {
    "queued": "Requests waiting on the replica for a batch slot (engine report).",
    "active": "Requests being decoded on the replica (engine report).",
    "free_slots": "Free batch slots on the replica (engine report).",
    "free_kv_tokens": "Free KV-cache capacity of the replica, in tokens (engine report).",
    "steps": "Engine steps the replica has run since it started (engine report).",
    "generated_tokens": "Tokens the replica has generated since it started (engine report).",
    "paused": "1 while the replica is paused (engine report).",
}


class ServingMetrics:
    """The front end's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP inference requests, by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds",
            "Time from receiving an inference request to sending its last byte (successes only).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from receiving an inference request to having its first generated token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens of successfully answered requests.",
            ["endpoint"],
            registry=r,
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens",
            "Generated tokens of successfully answered requests.",
            ["endpoint"],
            registry=r,
        )
        self.requests_running = Gauge(
            f"{PREFIX}_http_requests_running",
            "Inference requests this HTTP server is serving right now.",
            registry=r,
        )
        self.coordinator_up = Gauge(
            f"{PREFIX}_coordinator_up",
            "1 if the coordinator answered the STATS query of this scrape, else 0.",
            registry=r,
        )
        self.replicas_alive = Gauge(
            f"{PREFIX}_replicas_alive",
            "Number of data-parallel replicas the coordinator considers alive.",
            registry=r,
        )
        self.coordinator_in_flight = Gauge(
            f"{PREFIX}_coordinator_requests_in_flight",
            "Requests the coordinator has routed and not yet answered (all clients).",
            registry=r,
        )
        self.coordinator_clients = Gauge(
            f"{PREFIX}_coordinator_clients",
            "Clients connected to the coordinator.",
            registry=r,
        )
        self.replica_up = Gauge(
            f"{PREFIX}_replica_up",
            "1 if the replica (data-parallel rank) is alive, else 0.",
            ["data_parallel_rank"],
            registry=r,
        )
        self.replica_queue_depth = Gauge(
            f"{PREFIX}_replica_queue_depth",
            "Requests routed to the replica and not yet answered.",
            ["data_parallel_rank"],
            registry=r,
        )
        self.replica_outstanding_tokens = Gauge(
            f"{PREFIX}_replica_outstanding_tokens",
            "Tokens (prompt + to generate) outstanding on the replica, where the coordinator reports it.",
            ["data_parallel_rank"],
            registry=r,
        )
        self._known_ranks: set[str] = set()  # replicas that have gauges, for "coordinator down"
        self.replica_load = {
            name: Gauge(
                f"{PREFIX}_replica_engine_{name}", help_text, ["data_parallel_rank"], registry=r
            )
            for name, help_text in LOAD_GAUGES.items()
        }
        # Pre-create every outcome so a counter reads 0 (not absent) before its first event.
        for endpoint in ("completions", "chat_completions"):
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)
            self.latency.labels(endpoint)
            self.ttft.labels(endpoint)
            self.prompt_tokens.labels(endpoint)
            self.generation_tokens.labels(endpoint)

    # --- per request -------------------------------------------------------------------------

    def observe_outcome(self, endpoint: str, outcome: str) -> None:
        """Count one finished request; ``outcome`` must be one of ``OUTCOMES``."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.requests.labels(endpoint, outcome).inc()

    def observe_success(
        self, endpoint: str, latency_s: float, prompt_tokens: int, generated_tokens: int
    ) -> None:
        """Record a request answered in full: its latency and token counts."""
        self.observe_outcome(endpoint, "success")
        self.latency.labels(endpoint).observe(latency_s)
        self.prompt_tokens.labels(endpoint).inc(prompt_tokens)
        self.generation_tokens.labels(endpoint).inc(generated_tokens)

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        """Record the time to the first generated token of one request."""
        self.ttft.labels(endpoint).observe(seconds)

    # --- coordinator view, refreshed at scrape time -------------------------------------------

    def update_from_stats(self, stats: dict[str, Any] | None) -> None:
        """Set the coordinator and replica gauges from a STATS reply (``None``: no answer).

        Replicas missing from the reply are removed, so a scrape never shows a stale replica as
        alive; with no answer at all every replica reads as down.
        """
        if stats is None:
            self.coordinator_up.set(0)
            self.replicas_alive.set(0)
            for rank in self._known_ranks:
                self.replica_up.labels(rank).set(0)
            return
        self.coordinator_up.set(1)
        engines = stats.get("engines") or []
        self.coordinator_in_flight.set(_number(stats.get("requests_in_flight")))
        self.coordinator_clients.set(_number(stats.get("clients")))
        for gauge in (
            self.replica_up,
            self.replica_queue_depth,
            self.replica_outstanding_tokens,
            *self.replica_load.values(),
        ):
            gauge.clear()
        self._known_ranks = set()
        alive = 0
        for index, engine in enumerate(engines):
            if not isinstance(engine, dict):
                continue
            rank = str(engine.get("data_parallel_rank", index))
            is_alive = engine.get("alive") is True
            self._known_ranks.add(rank)
            alive += is_alive
            self.replica_up.labels(rank).set(1 if is_alive else 0)
            self.replica_queue_depth.labels(rank).set(_number(engine.get("outstanding_requests")))
            tokens = engine.get("outstanding_tokens")
            if isinstance(tokens, int) and not isinstance(tokens, bool):
                self.replica_outstanding_tokens.labels(rank).set(tokens)
            self._set_load(rank, engine.get("load"))
        self.replicas_alive.set(alive)

    def _set_load(self, rank: str, load: Any) -> None:
        """Per-replica gauges from the engine's last HEARTBEAT report, where it has one."""
        if not isinstance(load, dict):
            return
        for name, gauge in self.replica_load.items():
            value = load.get(name)
            if isinstance(value, (bool, int, float)):
                gauge.labels(rank).set(float(value))

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)


def _number(value: Any) -> float:
    """A gauge value from an untrusted field: numbers pass, anything else reads as 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value)
