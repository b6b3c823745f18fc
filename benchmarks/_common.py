"""Helpers the benchmark scripts share: latency percentiles.

Kept free of heavy imports (no zmq, torch or megatron_coord) so any benchmark can import it
before deciding what else to load.
"""

from __future__ import annotations


def percentiles(samples: list[float], digits: int | None = None) -> dict[str, float]:
    """p50/p90/p99 in milliseconds (nan without samples), rounded to ``digits`` if given."""
    if not samples:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        ms = ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
        return ms if digits is None else round(ms, digits)

    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99)}
