"""Prometheus metrics for the HTTP front end.

Every metric lives in the ``ServingMetrics`` object's own ``CollectorRegistry`` (never the
process-global default one), so two servers in one process -- as in tests -- never collide, and
``/metrics`` shows only what this server measured.

Request counters and histograms are updated as requests finish. Per-replica gauges (queue depth,
liveness) describe the coordinator's view and are refreshed from a ``STATS`` reply just before
each scrape, so they are never older than the scrape itself; they are built at scrape time
(``CoordinatorView``), never stored as per-process gauge values.

Several HTTP worker processes (``--http-workers N``) aggregate with prometheus_client's
multiprocess mode: each worker writes its request metrics to files in one shared directory
(``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before it starts the workers), and the
worker that answers a scrape sums them over every worker that ever ran (a restarted worker's
counts are kept), with ``requests_running`` summed over the live workers only. The coordinator
view comes from the answering worker's own STATS query: it is the one coordinator's state, the
same from every worker, so it is reported once, not summed.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
    "prefix_cache_hit_rate": "Share of admitted prompt tokens reused from the prefix cache (engine report).",
    "kv_blocks_cached": "KV blocks holding reusable prefixes, in use or not (engine report).",
    "kv_blocks_free": "KV blocks free or evictable (unused cached ones) (engine report).",
    "healthy": "1 while the replica serves; 0 when its steps keep failing or an update left its "
    "weights mixed (engine report).",
    "weight_bytes": "Bytes of the replica's weights, all its ranks (engine report).",
    "kv_bytes": "Bytes of the replica's KV cache, 0 while suspended (engine report).",
}


# The coordinator's view: (name, help) of the unlabelled gauges and of the per-replica ones.
COORDINATOR_GAUGES = {
    "coordinator_up": "1 if the coordinator answered the STATS query of this scrape, else 0.",
    "replicas_alive": "Number of data-parallel replicas the coordinator considers alive.",
    "coordinator_requests_in_flight": "Requests the coordinator has routed and not yet "
    "answered (all clients).",
    "coordinator_clients": "Clients connected to the coordinator.",
    "weight_update_last_seconds": "Duration of the last weight update round, published or not "
    "(0 before the first).",
}
# Labelled "info" gauges (value 1) naming weight versions, and the update rounds' outcomes.
VERSION_INFO = "weight_version_info"
REPLICA_VERSION_INFO = "replica_weight_version_info"
UPDATES = "weight_updates"
REPLICA_GAUGES = {
    "replica_up": "1 if the replica (data-parallel rank) is alive, else 0.",
    "replica_queue_depth": "Requests routed to the replica and not yet answered.",
    "replica_outstanding_tokens": "Tokens (prompt + to generate) outstanding on the replica, "
    "where the coordinator reports it.",
    **{f"replica_engine_{name}": help_text for name, help_text in LOAD_GAUGES.items()},
}


class CoordinatorView:
    """The coordinator and replica gauges of the last STATS reply, built at each scrape (a
    prometheus_client collector), so no per-process value of them exists to be summed."""

    def __init__(self) -> None:
        self.values: dict[str, float] = dict.fromkeys(COORDINATOR_GAUGES, 0.0)
        self.replicas: dict[str, dict[str, float]] = {name: {} for name in REPLICA_GAUGES}
        self.version: str | None = None  # the published weight version
        self.replica_versions: dict[str, str] = {}
        self.updates = {"published": 0.0, "failed": 0.0}

    def collect(self) -> Any:
        for name, help_text in COORDINATOR_GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=self.values[name])
        info = GaugeMetricFamily(
            f"{PREFIX}_{VERSION_INFO}", "The weight version the coordinator published (1).",
            labels=["version"],
        )  # fmt: skip
        if self.version is not None:
            info.add_metric([self.version], 1.0)
        yield info
        info = GaugeMetricFamily(
            f"{PREFIX}_{REPLICA_VERSION_INFO}", "Each replica's weight version (1).",
            labels=["data_parallel_rank", "version"],
        )  # fmt: skip
        for rank, version in self.replica_versions.items():
            info.add_metric([rank, version], 1.0)
        yield info
        rounds = CounterMetricFamily(
            f"{PREFIX}_{UPDATES}", "Weight update rounds by outcome (published or failed), as "
            "the coordinator counts them.", labels=["outcome"],
        )  # fmt: skip
        for outcome, count in self.updates.items():
            rounds.add_metric([outcome], count)
        yield rounds
        for name, help_text in REPLICA_GAUGES.items():
            family = GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["data_parallel_rank"])
            for rank, value in self.replicas[name].items():
                family.add_metric([rank], value)
            yield family


class ServingMetrics:
    """The front end's metrics, in a registry of their own.

    ``multiprocess_dir``: this process is one of several HTTP workers whose metrics live in that
    directory (prometheus_client multiprocess mode; ``PROMETHEUS_MULTIPROC_DIR`` must have named
    it before prometheus_client was imported here); ``render`` then sums every worker's.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.view = CoordinatorView()
        self.multiprocess_dir = multiprocess_dir
        self._aggregate: CollectorRegistry | None = None
        if multiprocess_dir is not None:
            self._aggregate = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._aggregate, path=multiprocess_dir)
            self._aggregate.register(self.view)
        else:
            r.register(self.view)
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
            multiprocess_mode="livesum",  # workers: the live ones' sum
        )
        self._known_ranks: set[str] = set()  # replicas that have gauges, for "coordinator down"
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
        view = self.view
        if stats is None:
            view.values["coordinator_up"] = 0.0
            view.values["replicas_alive"] = 0.0
            for rank in self._known_ranks:
                view.replicas["replica_up"][rank] = 0.0
            return
        view.values["coordinator_up"] = 1.0
        engines = stats.get("engines") or []
        view.values["coordinator_requests_in_flight"] = _number(stats.get("requests_in_flight"))
        view.values["coordinator_clients"] = _number(stats.get("clients"))
        view.values["weight_update_last_seconds"] = _number(stats.get("last_update_s"))
        version = stats.get("weight_version")
        view.version = version if isinstance(version, str) else None
        view.updates = {
            "published": _number(stats.get("updates_done")),
            "failed": _number(stats.get("updates_failed")),
        }
        view.replica_versions = {}
        replicas = view.replicas = {name: {} for name in REPLICA_GAUGES}
        self._known_ranks = set()
        alive = 0
        for index, engine in enumerate(engines):
            if not isinstance(engine, dict):
                continue
            rank = str(engine.get("data_parallel_rank", index))
            is_alive = engine.get("alive") is True
            self._known_ranks.add(rank)
            alive += is_alive
            replicas["replica_up"][rank] = 1.0 if is_alive else 0.0
            replicas["replica_queue_depth"][rank] = _number(engine.get("outstanding_requests"))
            tokens = engine.get("outstanding_tokens")
            if isinstance(tokens, int) and not isinstance(tokens, bool):
                replicas["replica_outstanding_tokens"][rank] = float(tokens)
            self._set_load(rank, engine.get("load"))
            if isinstance(engine.get("weight_version"), str):
                view.replica_versions[rank] = engine["weight_version"]
        view.values["replicas_alive"] = float(alive)

    def _set_load(self, rank: str, load: Any) -> None:
        """Per-replica gauges from the engine's last HEARTBEAT report, where it has one."""
        if not isinstance(load, dict):
            return
        for name in LOAD_GAUGES:
            value = load.get(name)
            if isinstance(value, (bool, int, float)):
                self.view.replicas[f"replica_engine_{name}"][rank] = float(value)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (every worker's, summed, when
        this is one of several)."""
        return generate_latest(self._aggregate if self._aggregate is not None else self.registry)


def _number(value: Any) -> float:
    """A gauge value from an untrusted field: numbers pass, anything else reads as 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value)
