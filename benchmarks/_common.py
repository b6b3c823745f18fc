"""Helpers the benchmark scripts share: latency percentiles and writing results.

Kept free of heavy imports (no zmq, torch or megatron_coord) so any benchmark can import it
before deciding what else to load.
"""

from __future__ import annotations

import json
import os
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def percentiles(samples: list[float], digits: int | None = None) -> dict[str, float]:
    """p50/p90/p99 in milliseconds (nan without samples), rounded to ``digits`` if given."""
    if not samples:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        ms = ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
        return ms if digits is None else round(ms, digits)

    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99)}


def write_results(path: str, out: dict[str, Any], indent: int = 1) -> None:
    """Print ``out`` as JSON (what a benchmark reports) and write it to ``path``."""
    text = json.dumps(out, indent=indent)
    print(text, flush=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
