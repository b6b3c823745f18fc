"""Draw the benchmark results in benchmarks/results/*.json as PNG pictures beside them.

Each picture comes from one JSON file written by a benchmark script; a missing file is skipped
(with a note), so the pictures can be redrawn after any single benchmark:

==========================  ===============================  ==================================
picture                     data                             made by
==========================  ===============================  ==================================
scaling_throughput.png      scaling.json                     benchmarks/scaling.py
scaling_latency.png         scaling.json                     benchmarks/scaling.py
coordinator_comparison.png  coordinator_throughput.json      benchmarks/coordinator_throughput.py
routing_latency.png         routing.json                     benchmarks/routing.py
http_throughput.png         http_throughput*.json            benchmarks/http_throughput.py
http_workers.png            http_throughput.json             benchmarks/http_throughput.py
scale_out.png               scale_out.json                   benchmarks/scale_out.py
engine_overhead.png         engine_overhead.json             benchmarks/engine_overhead.py
pack_unpack.png             pack_unpack.json                 benchmarks/pack_unpack.py
tp_broadcast.png            tp_broadcast.json                benchmarks/tp_broadcast.py
prefix_routing.png          prefix_routing.json              benchmarks/prefix_routing.py
weight_update.png           weight_update.json               benchmarks/weight_update.py
weight_update_tp2.png       weight_update_tp2.json           benchmarks/weight_update.py (TP 2)
==========================  ===============================  ==================================

Run: ``python benchmarks/plot.py [--results DIR] [--only scaling coordinator ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PERCENTILES = ("p50", "p90", "p99")
COLORS = {"p50": "#4c72b0", "p90": "#dd8452", "p99": "#c44e52"}
SYSTEM_LABELS = {
    "megatron_coord": "megatron_coord (ours)",
    "megatron_core_0.16.1": "Megatron-core 0.16.1",
    "megatron_coord_019_peers": "megatron_coord (ours, 0.19 peers)",
    "megatron_core_0.19.2": "Megatron-core 0.19.2",
    "zmq_proxy": "libzmq proxy (ceiling)",
}


# ---------------------------------------------------------------------- helpers


def load(results: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def machine_note(data: dict[str, Any]) -> str:
    """'2-CPU host' from a result's machine block, so nobody reads these as GPU numbers."""
    cpus = data.get("machine", {}).get("cpus")
    return f"{cpus}-CPU shared host" if cpus else "CPU host"


def grouped_bars(
    ax: Axes,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    colors: dict[str, str] | None = None,
    log: bool = False,
    fmt: str = "{:.3g}",
) -> None:
    """Bars of every series side by side within each group, each labelled with its value."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name, color=(colors or {}).get(name))
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if log:
        plain_log_y(ax)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3, which="both" if log else "major")


def value_bars(
    ax: Axes, labels: Sequence[str], values: Sequence[float], fmt: str, ylabel: str, color: Any
) -> None:
    """One bar per label, each labelled with its value (``fmt``), on a y grid."""
    bars = ax.bar(labels, values, color=color)
    ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def plain_log_y(ax: Axes, minor: bool = False) -> None:
    """A log y axis labelled 0.1, 10 (not 10^1); ``minor``: label the minor ticks too."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if minor:
        ax.yaxis.set_minor_formatter(plain)


def save(fig: Figure, results: str, name: str) -> str:
    path = os.path.join(results, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- pictures


def plot_scaling(results: str) -> list[str]:
    """Requests/s and latency percentiles against the number of replicas."""
    data = load(results, "scaling.json")
    if data is None:
        return []
    cfg, series = data["config"], data["series"]
    titles = {
        "simulated": (
            f"simulated engines: {cfg['step_ms']:g} ms decode step, batch {cfg['max_batch']}, "
            f"{cfg['generate_tokens']} tokens/request"
        ),
        "instant": "instant fake engines: coordinator, clients and engines share the CPUs",
    }
    kinds = [k for k in ("simulated", "instant") if series.get(k)]
    load_note = f"{data['in_flight']} requests in flight, {machine_note(data)}"

    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        xs = [p["replicas"] for p in series[kind]]
        ys = [p["requests_per_s"] for p in series[kind]]
        ax.plot(xs, ys, "o-", label="measured", color="#4c72b0")
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)  # fmt: skip
        if kind == "simulated":
            # Engine capacity N * batch / (tokens * step), capped by the fixed window: each
            # request needs at least tokens * step seconds.
            per_replica = data["simulated_capacity_per_replica_rps"]
            window_cap = data["in_flight"] / (cfg["generate_tokens"] * cfg["step_ms"] / 1e3)
            ideal = [min(n * per_replica, window_cap) for n in xs]
            ax.plot(xs, ideal, "--", color="gray", label="ideal (engine capacity)")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlim(0, max(xs) + 0.5)
        ax.set_xlabel("data-parallel replicas (engine processes)")
        ax.set_ylabel("throughput (requests/s)")
        ax.set_ylim(bottom=0, top=max(ys) * 1.2)
        ax.set_title(titles[kind], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Throughput vs replicas, our coordinator ({load_note})", fontsize=11)
    paths = [save(fig, results, "scaling_throughput.png")]

    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        xs = [p["replicas"] for p in series[kind]]
        for q in PERCENTILES:
            ax.plot(xs, [p[f"{q}_ms"] for p in series[kind]], "o-", label=q, color=COLORS[q])
        if kind == "simulated":
            floor = cfg["generate_tokens"] * cfg["step_ms"]
            ax.axhline(floor, ls="--", color="gray", label=f"no queueing ({floor:g} ms)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        plain_log_y(ax, minor=True)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("data-parallel replicas (engine processes)")
        ax.set_ylabel("request latency (ms, log scale)")
        ax.set_title(titles[kind], fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Latency percentiles vs replicas ({load_note})", fontsize=11)
    paths.append(save(fig, results, "scaling_latency.png"))
    return paths


def _two_lines(label: str) -> str:
    """A system's label broken so that five fit side by side."""
    return (
        label.replace(" (", "\n(")
        .replace("Megatron-core ", "Megatron-core\n")
        .replace(", 0.19", ",\n0.19")
    )


def plot_coordinator(results: str) -> list[str]:
    """Ours vs Megatron-core 0.16.1 and 0.19.2 vs a libzmq proxy: throughput and latency."""
    data = load(results, "coordinator_throughput.json")
    if data is None:
        return []
    cfg, loaded = data["config"], data["throughput"]
    systems = list(loaded)
    labels = [_two_lines(SYSTEM_LABELS.get(s, s)) for s in systems]
    palette = {
        "megatron_coord": "#4c72b0",
        "megatron_core_0.16.1": "#c44e52",
        "megatron_coord_019_peers": "#64b5cd",
        "megatron_core_0.19.2": "#dd8452",
        "zmq_proxy": "#8c8c8c",
    }
    colors = [palette.get(s, "#55a868") for s in systems]
    single = data.get("single_request_latency", {})

    fig, axes = plt.subplots(1, 3 if single else 2, figsize=(18 if single else 12, 5.0))
    ax = axes[0]
    rps = [loaded[s]["requests_per_s"] for s in systems]
    value_bars(ax, labels, rps, "{:,.0f}", "throughput (requests/s)", colors)
    ax.set_title(
        f"Throughput: {cfg['engines']} instant engines, "
        f"{cfg['clients']} clients x {cfg['window']} in flight",
        fontsize=9,
    )
    grouped_bars(
        axes[1],
        labels,
        {q: [loaded[s][f"{q}_ms"] for s in systems] for q in PERCENTILES},
        "latency under load (ms)",
        COLORS,
        fmt="{:.1f}",
    )
    axes[1].set_title("Latency percentiles under the same load", fontsize=9)
    for axis in axes[:2]:
        axis.tick_params(axis="x", labelsize=8)
    axes[1].legend(fontsize=8)
    if single:
        names = list(single)
        grouped_bars(
            axes[2],
            [_two_lines(SYSTEM_LABELS.get(s, s)) for s in names],
            {q: [single[s][f"{q}_ms"] for s in names] for q in PERCENTILES},
            "latency (ms, log scale)",
            COLORS,
            log=True,
            fmt="{:.2f}",
        )
        axes[2].set_title("One request at a time (client + coordinator + 1 engine)", fontsize=9)
        axes[2].legend(fontsize=8)
    fig.suptitle(
        f"Coordinator comparison ({cfg['prompt_tokens']}-token prompts, "
        f"{cfg['generate_tokens']} tokens out, {machine_note(data)})",
        fontsize=11,
    )
    return [save(fig, results, "coordinator_comparison.png")]


def plot_routing(results: str) -> list[str]:
    """Latency percentiles and makespan per routing policy (benchmarks/routing.py)."""
    data = load(results, "routing.json")
    if data is None:
        return []
    policies = data["policies"]
    names = list(policies)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    grouped_bars(
        axes[0],
        names,
        {q: [policies[p][f"latency_{q}_s"] * 1e3 for p in names] for q in PERCENTILES},
        "request latency (ms)",
        COLORS,
        fmt="{:.0f}",
    )
    axes[0].set_title("Latency percentiles", fontsize=9)
    axes[0].legend(fontsize=8)
    makespans = [policies[p]["makespan_s"] for p in names]
    value_bars(axes[1], names, makespans, "{:.2f}", "time to finish every request (s)", "#55a868")
    axes[1].set_title("Makespan", fontsize=9)
    workload, replicas = data.get("workload", {}), data.get("replicas", {})
    fig.suptitle(
        f"Routing policies: {workload.get('requests', '?')} requests at "
        f"{workload.get('rate_per_s', '?')}/s over {replicas.get('count', '?')} simulated replicas, "
        f"host {data.get('host', '?')}",
        fontsize=11,
    )
    return [save(fig, results, "routing_latency.png")]


def plot_http(results: str) -> list[str]:
    """OpenAI-compatible HTTP front end vs the direct InferenceClient, same coordinator."""
    runs = [
        (name, label)
        for name, label in (
            ("http_throughput.json", "instant fake engines"),
            ("http_throughput_launch.json", "torchrun launch, default model"),
        )
        if load(results, name) is not None
    ]
    if not runs:
        return []
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, (name, label) in zip(axes[0], runs, strict=True):
        data = load(results, name)
        assert data is not None
        keys = {
            "HTTP /v1/completions": "http_completions",
            "direct client": "direct_inference_client",
        }
        labels = [
            f"{name}\np50 {data[key]['p50_ms']:.1f} ms, p99 {data[key]['p99_ms']:.1f} ms"
            for name, key in keys.items()
        ]
        rps = [data[key]["requests_per_s"] for key in keys.values()]
        value_bars(ax, labels, rps, "{:,.1f}", "throughput (requests/s)", ["#4c72b0", "#8c8c8c"])
        cfg = data["config"]
        ax.set_title(
            f"{label}: {cfg['replicas']} replicas, {cfg['max_tokens']} tokens out, "
            f"{cfg['clients']} client x {cfg['window']} in flight",
            fontsize=9,
        )
    fig.suptitle(f"HTTP front end vs direct client ({machine_note(data)})", fontsize=11)
    return [save(fig, results, "http_throughput.png")]


def plot_http_workers(results: str) -> list[str]:
    """Unary requests/s and streamed tokens/s by HTTP worker count, one run side by side."""
    data = load(results, "http_throughput.json")
    if data is None or "http_workers" not in data:
        return []
    runs = data["http_workers"]
    labels = [f"{w} worker{'s' if w != '1' else ''}" for w in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    direct = data["direct_inference_client"]["requests_per_s"]
    value_bars(
        axes[0],
        [*labels, "direct client"],
        [*(r["unary"]["requests_per_s"] for r in runs.values()), direct],
        "{:,.0f}",
        "unary requests/s",
        ["#4c72b0"] * len(runs) + ["#8c8c8c"],
    )
    axes[0].set_title("POST /v1/completions (unary)", fontsize=9)
    stream = next(iter(runs.values()))["stream"]
    value_bars(
        axes[1],
        labels,
        [r["stream"]["tokens_per_s"] for r in runs.values()],
        "{:,.0f}",
        "streamed tokens/s",
        "#55a868",
    )
    axes[1].set_title(
        f"{stream['concurrent_streams']} concurrent streams x {stream['tokens_per_stream']} tokens",
        fontsize=9,
    )
    fig.suptitle(f"--http-workers on one port ({machine_note(data)}, fake engines)", fontsize=11)
    return [save(fig, results, "http_workers.png")]


def plot_scale_out(results: str) -> list[str]:
    """Coordinator CPU per routed request against replicas and connected clients, per policy."""
    data = load(results, "scale_out.json")
    if data is None:
        return []
    runs = data["runs"]
    replicas = sorted({r["replicas"] for r in runs})
    clients = sorted({r["clients"] for r in runs})
    policies = sorted({r["policy"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, axis, fixed, xs in (
        (axes[0], "replicas", ("clients", clients[0]), replicas),
        (axes[1], "clients", ("replicas", replicas[0]), clients),
    ):
        for policy in policies:
            ys = [
                next(
                    r["coordinator_cpu_us_per_request"]
                    for r in runs
                    if r["policy"] == policy and r[axis] == x and r[fixed[0]] == fixed[1]
                )
                for x in xs
            ]
            ax.plot(xs, ys, marker="o", label=policy)
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(
                    f"{y:.0f}", (x, y), fontsize=7, textcoords="offset points", xytext=(0, 5)
                )
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(f"{axis} ({fixed[0]} = {fixed[1]})")
        ax.set_ylabel("coordinator CPU µs per request (median of repeats)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    memory = data.get("memory", {})
    fig.suptitle(
        f"Coordinator at scale ({machine_note(data)}); RSS per 10k requests in flight: "
        f"{memory.get('rss_mib_per_10k_in_flight', '?')} MiB",
        fontsize=11,
    )
    return [save(fig, results, "scale_out.png")]


def plot_engine_overhead(results: str) -> list[str]:
    """Tokens/s of the engine alone vs the same work through coordinator and client."""
    data = load(results, "engine_overhead.json")
    if data is None:
        return []
    modes = {"engine in-process": "in_process", "through coordinator": "end_to_end"}
    grouped_bars(
        (ax := plt.subplots(figsize=(7, 4.5))[1]),
        list(modes),
        {
            "median": [data[m]["median_tokens_per_s"] for m in modes.values()],
            "best": [data[m]["best_tokens_per_s"] for m in modes.values()],
        },
        "generated tokens/s",
        {"median": "#4c72b0", "best": "#55a868"},
        fmt="{:.0f}",
    )
    ax.legend(fontsize=8)
    w = data["workload"]
    ax.set_title(
        f"Engine overhead: {w['requests']} requests x {w['tokens']} tokens, batch "
        f"{w['max_batch_size']}, default model on CPU\n"
        f"through the coordinator: {1 - data['overhead_median']:.0%} of the in-process rate "
        f"(median), {1 - data['overhead_best']:.0%} (best)",
        fontsize=10,
    )
    return [save(ax.figure, results, "engine_overhead.png")]


def plot_pack_unpack(results: str) -> list[str]:
    """The csrc/ extension vs numpy vs pure Python packing of one step's token buffer."""
    data = load(results, "pack_unpack.json")
    if data is None:
        return []
    cases = data["cases"]
    names = list(cases)
    impls = list(next(iter(cases.values())).keys() - {"words"})
    impls.sort(key=lambda i: ["extension", "numpy", "python"].index(i) if i in
               ["extension", "numpy", "python"] else 9)  # fmt: skip
    colors = {"extension": "#4c72b0", "numpy": "#dd8452", "python": "#8c8c8c"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = [f"{n}\n({cases[n]['words']} words)" for n in names]
    for ax, op in zip(axes, ("pack", "unpack"), strict=True):
        grouped_bars(
            ax,
            groups,
            {i: [cases[n][i][f"{op}_us"] for n in names] for i in impls},
            "µs per call (log scale)",
            colors,
            log=True,
            fmt="{:.1f}",
        )
        ax.set_title(f"{op}_step", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Token-buffer packing for the TP broadcast (C++ extension vs alternatives)")
    return [save(fig, results, "pack_unpack.png")]


def plot_tp_broadcast(results: str) -> list[str]:
    """Per-step cost of the TP request broadcast vs a bare torch.distributed broadcast."""
    data = load(results, "tp_broadcast.json")
    if data is None:
        return []
    cases = data["cases"]
    names = list(cases)
    grouped_bars(
        (ax := plt.subplots(figsize=(8, 4.5))[1]),
        [f"{n}\n({cases[n]['words']} words)" for n in names],
        {
            "step exchange (pack + broadcast + unpack)": [cases[n]["exchange_us"] for n in names],
            "bare broadcast of the same words (floor)": [
                cases[n]["bare_broadcast_us"] for n in names
            ],
        },
        "µs per step on rank 0",
        fmt="{:.0f}",
    )
    ax.legend(fontsize=8)
    ax.set_title(
        f"TP broadcast per step: {data['backend']}, TP={data['tensor_parallel_size']}, "
        f"{data['device']}",
        fontsize=10,
    )
    return [save(ax.figure, results, "tp_broadcast.png")]


def plot_prefix_routing(results: str) -> list[str]:
    """Multi-turn chat on real engines per routing policy and engine cache: TTFT, throughput,
    cache hit rate and the requests each replica served (benchmarks/prefix_routing.py)."""
    data = load(results, "prefix_routing.json")
    if data is None:
        return []
    configs = data["configs"]
    names = list(configs)
    labels = [
        n.removesuffix("_no_cache").replace("_", "\n") + ("\n(cache off)" * n.endswith("_no_cache"))
        for n in names
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), gridspec_kw={"width_ratios": [2, 1, 1, 1.4]})
    grouped_bars(
        axes[0],
        labels,
        {q: [configs[n]["ttft"][f"{q}_ms"] for n in names] for q in ("p50", "p99")},
        "time to first token (ms)",
        COLORS,
        fmt="{:.0f}",
    )
    axes[0].set_title("Time to first token", fontsize=9)
    axes[0].legend(fontsize=8)
    rps = [configs[n]["requests_per_s"] for n in names]
    value_bars(axes[1], labels, rps, "{:.2f}", "requests/s", "#55a868")
    axes[1].set_title("Throughput", fontsize=9)
    hits = [configs[n]["prefix_cache_hit_rate"] * 100 for n in names]
    value_bars(axes[2], labels, hits, "{:.0f}%", "prompt tokens from the cache (%)", "#8172b3")
    axes[2].set_title("Engine prefix-cache hit rate", fontsize=9)
    ranks = len(configs[names[0]]["replicas"])
    grouped_bars(
        axes[3],
        labels,
        {
            f"replica {r}": [configs[n]["replicas"][r]["requests"] for n in names]
            for r in range(ranks)
        },
        "requests served",
        fmt="{:.0f}",
    )
    axes[3].set_title("Per-replica load", fontsize=9)
    axes[3].legend(fontsize=8, loc="lower center")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    w = data["workload"]
    met = ", ".join(
        f"{t['target']} {t['value']} ({t['goal']}: {'met' if t['met'] else 'missed'})"
        for t in data.get("targets", [])
        if t.get("value") is not None
    )
    fig.suptitle(
        f"Prefix-aware routing: {w['conversations']} chats x {w['turns']} turns over "
        f"{w['system_prompts']} system prompts of {w['system_tokens']} tokens, "
        f"{data['launch']['replicas']} real replicas ({machine_note(data)})"
        + (f"\ntargets: {met}" if met else ""),
        fontsize=10,
    )
    return [save(fig, results, "prefix_routing.png")]


def plot_weight_update(results: str) -> list[str]:
    """Time to the first token under new weights per source, against the raw broadcast of the
    same bytes and a restart (log scale); throughput with and without a stream of updates.
    One picture per result: weight_update.json (TP 1), weight_update_tp2.json (TP 2)."""
    paths = []
    for name in ("weight_update", "weight_update_tp2"):
        data = load(results, f"{name}.json")
        if data is not None:
            paths.append(_weight_update_figure(data, results, f"{name}.png"))
    return paths


def _weight_update_figure(data: dict[str, Any], results: str, name: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), gridspec_kw={"width_ratios": [2.2, 1]})
    bars = [("raw broadcast\n(floor)", data.get("broadcast_floor_s"), "#8c8c8c")]
    for source, seconds in data.get("update_s", {}).items():
        bars.append((f"update:\n{source.replace('_', ' ')}", seconds, "#4c72b0"))
    bars.append(("restart", data.get("restart_s"), "#c44e52"))
    bars = [bar for bar in bars if bar[1] is not None]
    value_bars(
        axes[0],
        [b[0] for b in bars],
        [b[1] for b in bars],
        "{:.3g} s",
        "seconds (call to first token under the new weights)",
        [b[2] for b in bars],
    )
    plain_log_y(axes[0])
    axes[0].set_title(f"{data['model_bytes'] / 1e6:.0f} MB of weights", fontsize=9)
    if "load_with_updates" in data:
        without, with_ = data["load_without_updates"], data["load_with_updates"]
        updates = with_.get("updates", 0)
        value_bars(
            axes[1],
            ["no updates", f"{updates} updates\n(every {data['config']['update_every_s']:g} s)"],
            [without["requests_per_s"], with_["requests_per_s"]],
            "{:.1f}",
            "requests/s (closed loop)",
            ["#55a868", "#dd8452"],
        )
        axes[1].set_title(
            f"throughput kept {data['throughput_kept']:.0%}, requests lost {data['requests_lost']}",
            fontsize=9,
        )
    else:
        axes[1].set_axis_off()
    c = data["config"]
    met = "\n".join(
        f"{g['goal']}: {g['value']} ({'met' if g['met'] else 'missed'})" for g in data["goals"]
    )
    fig.suptitle(
        f"Weight updates while serving: {c['replicas']} replicas x TP {c['tensor_parallel_size']}"
        f", {c['backend']}, mode {c['mode']} ({machine_note(data)})" + (f"\n{met}" if met else ""),
        fontsize=10,
    )
    return save(fig, results, name)


PLOTS: dict[str, Callable[[str], list[str]]] = {
    "scaling": plot_scaling,
    "coordinator": plot_coordinator,
    "routing": plot_routing,
    "http": plot_http,
    "http_workers": plot_http_workers,
    "scale_out": plot_scale_out,
    "engine_overhead": plot_engine_overhead,
    "pack_unpack": plot_pack_unpack,
    "tp_broadcast": plot_tp_broadcast,
    "prefix_routing": plot_prefix_routing,
    "weight_update": plot_weight_update,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", default=RESULTS, help="directory of the JSON results")
    parser.add_argument("--only", nargs="+", choices=list(PLOTS), help="draw only these")
    args = parser.parse_args(argv)
    failed = False
    for name in args.only or PLOTS:
        try:
            paths = PLOTS[name](args.results)
        except (KeyError, TypeError, ValueError) as exc:  # a result file of another shape
            print(f"{name}: cannot draw ({type(exc).__name__}: {exc})", file=sys.stderr)
            failed = True
            continue
        for path in paths:
            print(path)
        if not paths:
            print(f"{name}: no results yet, skipped", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
