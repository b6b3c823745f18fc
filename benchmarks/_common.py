"""Helpers the benchmark scripts share: starting a coordinator, latency percentiles, writing
results.

Kept free of heavy imports at module level (megatron_coord is imported only when a coordinator
is started) so any benchmark can import it before deciding what else to load.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def start_coordinator(
    replicas: int, entrypoint: Callable[..., None] | None = None
) -> tuple[Any, multiprocessing.Process, Any]:
    """A coordinator in a spawned process, started the way rank 0 of a launch starts ours
    (``entrypoint(pipe, ready, replicas, tokenizer)``, ours unless given, with the byte
    tokenizer): returns what it sends on its pipe (its address), the process, its ready event."""
    from megatron_coord.coordinator import DataParallelInferenceCoordinator
    from megatron_coord.testing.fake_engine import ByteTokenizer

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    ready = ctx.Event()
    process = ctx.Process(
        target=entrypoint or DataParallelInferenceCoordinator.entrypoint,
        args=(child, ready, replicas, ByteTokenizer()),
        daemon=True,
    )
    process.start()
    child.close()
    return parent.recv(), process, ready


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
