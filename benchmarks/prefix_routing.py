"""Cache-aware routing on real engines: a multi-turn chat workload under each routing policy.

Each configuration is a fresh ``torchrun --nproc-per-node 2 launch/serve.py`` (2 replicas of
the embedded default model on CPU, TP=1, one thread each) with ``--routing POLICY`` and the
engine's prefix cache on or off (``--no-prefix-caching``). One InferenceClient replays the same
seeded chat workload against every configuration, side by side in one run:

* ``--conversations`` conversations of ``--turns`` turns, each using one of ``--system-prompts``
  shared system prompts of ``--system-tokens`` tokens (token prompts: seeded random GPT-2 ids).
* Every turn resends the whole history: prompt = system prompt + every earlier user turn and
  the model's own reply to it + the new user turn of ``--user-tokens`` tokens. Replies are
  greedy, exactly ``--reply-tokens`` tokens (no termination id), so every configuration sees
  the same prompts (checked: a digest of every prompt is compared across configurations).
* Arrivals: conversation starts are Poisson at ``--rate`` per second; a user answers a reply
  after a seeded exponential think time (mean ``--think``). The schedule (start times, think
  times, user tokens) is the same for every configuration; each turn is sent when its
  conversation's previous reply is complete and its think time has passed (a closed loop per
  conversation, as a chat user is).

Requests stream (``streaming_interval=1``): time to first token is submit -> first partial at
the client. Throughput is requests (and prompt / generated tokens) per second of makespan (first
submit -> last reply). Per-replica load is what each replica served (requests, prompt tokens,
counted from the replies' ``data_parallel_rank``) and what it computed (prompt tokens prefilled
= queried - cache hits). The cache hit rate comes from the engines' heartbeat load reports
(``prefix_cache_hit_tokens / prefix_cache_queried_tokens`` in the coordinator's STATS
``engines[].load``, the warm-up subtracted).

Run: ``python benchmarks/prefix_routing.py [--conversations 64 --turns 6 ...]``. Prints JSON,
writes benchmarks/results/prefix_routing.json and draws benchmarks/results/prefix_routing.png
(benchmarks/plot.py).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _common import RESULTS, percentiles  # noqa: E402
from http_throughput import process_cpu_s  # noqa: E402

# (name, --routing, prefix caching); a policy the checkout does not know is left out, said so.
CONFIGS = (
    ("round_robin", "round_robin", True),
    ("least_loaded", "least_loaded", True),
    ("prefix_aware", "prefix_aware", True),
    ("least_loaded_no_cache", "least_loaded", False),
    ("prefix_aware_no_cache", "prefix_aware", False),
)
VOCAB = 50000  # token ids drawn from [1, VOCAB): GPT-2 ids, below its end-of-text (50256)


@dataclass
class Conversation:
    """One chat: its system prompt, start time, user turns and the think time before each."""

    index: int
    system: int
    start_s: float
    users: list[list[int]]
    think_s: list[float]  # before turns 2..n (after the previous reply)


def workload(args: argparse.Namespace) -> tuple[list[list[int]], list[Conversation]]:
    """The seeded system prompts and conversations (the same for every configuration)."""
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    systems = [tokens(args.system_tokens) for _ in range(args.system_prompts)]
    conversations, now = [], 0.0
    for index in range(args.conversations):
        now += rng.expovariate(args.rate) if args.rate > 0 else 0.0
        conversations.append(
            Conversation(
                index=index,
                system=rng.randrange(args.system_prompts),
                start_s=now,
                users=[tokens(args.user_tokens) for _ in range(args.turns)],
                think_s=[
                    rng.expovariate(1 / args.think) if args.think > 0 else 0.0
                    for _ in range(args.turns - 1)
                ],
            )
        )
    return systems, conversations


def longest_prompt(args: argparse.Namespace) -> int:
    """Tokens in the last turn's prompt (it must fit the model with its reply)."""
    return args.system_tokens + args.turns * args.user_tokens + (args.turns - 1) * args.reply_tokens


def working_set_blocks(args: argparse.Namespace) -> int:
    """KV blocks that hold every system prompt and every conversation's whole history once
    (full blocks only): what one replica needs to miss nothing if it served everything."""
    history = longest_prompt(args) + args.reply_tokens - args.system_tokens
    per_system = args.system_tokens // args.kv_block_size
    return args.system_prompts * per_system + args.conversations * (
        (args.system_tokens + history) // args.kv_block_size - per_system
    )


# ---------------------------------------------------------------------- the launch


class Launch:
    """``torchrun --nproc-per-node R launch/serve.py --port 0 --ready-file F ...``: real engines
    on the default model; ``address`` once every replica has registered."""

    def __init__(self, args: argparse.Namespace, routing: str, caching: bool) -> None:
        self.dir = tempfile.mkdtemp(prefix="prefix_routing_")
        self.ready = os.path.join(self.dir, "ready")
        self.log_path = os.path.join(self.dir, "launch.log")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.replicas),
            "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
            os.path.join(ROOT, "launch", "serve.py"), "--port", "0", "--ready-file", self.ready,
            "--routing", routing, "--max-batch-size", str(args.max_batch_size),
            "--kv-block-size", str(args.kv_block_size), "--heartbeat-interval", "0.5",
        ]  # fmt: skip
        if args.kv_blocks:
            command += ["--kv-blocks", str(args.kv_blocks)]
        if not caching:
            command.append("--no-prefix-caching")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        deadline = time.monotonic() + 300
        while not os.path.exists(self.ready):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("serve.py did not start:\n" + self.output())
            time.sleep(0.1)
        self.address = pathlib.Path(self.ready).read_text().strip()

    def output(self) -> str:
        return pathlib.Path(self.log_path).read_text()[-4000:]

    def stop(self) -> None:
        """After a client's STOP the launch exits by itself; else it is SIGTERMed, then
        killed. The temporary directory goes."""
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        finally:
            self.log.close()
            for name in os.listdir(self.dir):
                os.unlink(os.path.join(self.dir, name))
            os.rmdir(self.dir)


def cache_counters(stats: dict[str, Any]) -> dict[int, dict[str, int]]:
    """Per replica (data-parallel rank): the engines' cumulative load-report counters."""
    out = {}
    for engine in stats["engines"]:
        load = engine.get("load") or {}
        out[engine["data_parallel_rank"]] = {
            "queried": int(load.get("prefix_cache_queried_tokens", 0)),
            "hit": int(load.get("prefix_cache_hit_tokens", 0)),
            "processed": int(load.get("processed_tokens", 0)),
            "kv_blocks": load.get("kv_blocks"),
            "kv_blocks_cached": load.get("kv_blocks_cached"),
        }
    return out


async def settled_stats(client: Any, replicas: int, queried: dict[int, int]) -> dict:
    """STATS once every replica's load report has caught up with the prompts it was sent (its
    prefix_cache_queried_tokens reached ``queried``: heartbeats come every 0.5 s), 10 s at
    most."""
    deadline = time.monotonic() + 10
    while True:
        stats = await client.stats()
        counters = cache_counters(stats)
        if len(counters) == replicas and all(
            counters[rank]["queried"] >= want for rank, want in queried.items()
        ):
            return stats
        if time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


async def replay(
    address: str,
    args: argparse.Namespace,
    systems: list[list[int]],
    conversations: list[Conversation],
    launch_pid: int,
) -> dict[str, Any]:
    """Warm each replica up, then play every conversation; each turn a streaming request.
    Also the CPU seconds the launch's processes (engines, coordinator, agent) spent on it."""
    from megatron_coord.client import InferenceClient

    client = InferenceClient(address)
    await client.start()
    await client.wait_ready(args.replicas, timeout=60)
    params = {
        "num_tokens_to_generate": args.reply_tokens,
        "top_k": 1,
        "termination_id": -1,
        "streaming_interval": 1,
    }
    # Warm-up (first-step costs: allocator, kernels): short prompts unrelated to the workload,
    # two per replica at once so every policy spreads them; their cache counts are subtracted.
    rng = random.Random(-1)
    warm = [[rng.randrange(1, VOCAB) for _ in range(8)] for _ in range(2 * args.replicas)]
    warm_params = {**params, "num_tokens_to_generate": 2}
    warmed = await asyncio.gather(*(client.add_request(p, warm_params) for p in warm))
    processed = {r: 0 for r in range(args.replicas)}
    for record in warmed:
        request = record["requests"][0]
        processed[request["data_parallel_rank"]] += len(request["prompt_tokens"])
    before = await settled_stats(client, args.replicas, processed)
    turns: list[dict[str, Any]] = []
    digest = hashlib.sha256()
    digests: dict[tuple[int, int], str] = {}
    loop = asyncio.get_running_loop()
    cpu_before = process_cpu_s(launch_pid)
    start = loop.time()

    async def chat(conv: Conversation) -> None:
        history = list(systems[conv.system])
        await asyncio.sleep(max(0.0, start + conv.start_s - loop.time()))
        for turn, user in enumerate(conv.users):
            if turn:
                await asyncio.sleep(conv.think_s[turn - 1])
            prompt = history + user
            submitted = loop.time()
            first = None
            record: dict[str, Any] = {}
            async for item in client.add_request_streaming(prompt, params):
                if "requests" in item:
                    record = item["requests"][0]
                elif first is None and item["tokens"]:
                    first = loop.time()
            done = loop.time()
            generated = list(record["generated_tokens"])
            if len(generated) != args.reply_tokens:
                raise RuntimeError(f"a reply of {len(generated)} tokens, not {args.reply_tokens}")
            digests[(conv.index, turn)] = hashlib.sha256(repr(prompt).encode()).hexdigest()
            turns.append(
                {
                    "conversation": conv.index,
                    "turn": turn,
                    "submit_s": submitted - start,
                    "ttft_s": (first if first is not None else done) - submitted,
                    "latency_s": done - submitted,
                    "done_s": done - start,
                    "prompt_tokens": len(prompt),
                    "generated_tokens": len(generated),
                    "rank": record["data_parallel_rank"],
                }
            )
            history = prompt + generated

    await asyncio.gather(*(chat(conv) for conv in conversations))
    cpu_s = process_cpu_s(launch_pid) - cpu_before
    base = cache_counters(before)
    processed = {r: base.get(r, {}).get("queried", 0) for r in range(args.replicas)}
    for t in turns:
        processed[t["rank"]] += t["prompt_tokens"]
    after = await settled_stats(client, args.replicas, processed)
    await asyncio.wait_for(client.stop_engines(), 60)
    client.stop()
    for key in sorted(digests):
        digest.update(digests[key].encode())
    return {
        "turns": turns,
        "before": before,
        "after": after,
        "digest": digest.hexdigest(),
        "cpu_s": cpu_s,
    }


def summarize(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's numbers, pooled over its rounds: throughput over the summed
    makespans, percentiles over every turn, per-replica counts summed."""
    turns = [dict(t, round=i) for i, r in enumerate(rounds) for t in r["turns"]]
    makespans = [
        max(t["done_s"] for t in r["turns"]) - min(t["submit_s"] for t in r["turns"])
        for r in rounds
    ]
    makespan = sum(makespans)
    cpu_s = sum(r["cpu_s"] for r in rounds)
    prompt_tokens = sum(t["prompt_tokens"] for t in turns)
    generated = sum(t["generated_tokens"] for t in turns)
    replicas = []
    for rank in range(args.replicas):
        mine = [t for t in turns if t["rank"] == rank]
        queried = hit = 0
        for r in rounds:
            a = cache_counters(r["after"]).get(rank, {})
            b = cache_counters(r["before"]).get(rank, {})
            queried += a.get("queried", 0) - b.get("queried", 0)
            hit += a.get("hit", 0) - b.get("hit", 0)
        replicas.append(
            {
                "data_parallel_rank": rank,
                "requests": len(mine),
                "prompt_tokens": sum(t["prompt_tokens"] for t in mine),
                "prefix_cache_queried_tokens": queried,
                "prefix_cache_hit_tokens": hit,
                "prefilled_tokens": queried - hit,
                "prefix_cache_hit_rate": round(hit / queried, 4) if queried else 0.0,
                "kv_blocks": cache_counters(rounds[-1]["after"]).get(rank, {}).get("kv_blocks"),
            }
        )
    queried = sum(r["prefix_cache_queried_tokens"] for r in replicas)
    hit = sum(r["prefix_cache_hit_tokens"] for r in replicas)

    def imbalance(key: str) -> float:
        values = [r[key] for r in replicas]
        mean = sum(values) / len(values)
        return round(max(values) / mean, 3) if mean else float("nan")

    def p50(selected: list[dict[str, Any]]) -> float:
        return percentiles([t["ttft_s"] for t in selected], 1)["p50_ms"]

    chats = {(t["round"], t["conversation"]) for t in turns}
    ttft = [t["ttft_s"] for t in turns]
    return {
        "requests": len(turns),
        "rounds": len(rounds),
        "makespan_s": round(makespan, 3),
        "makespan_s_per_round": [round(m, 3) for m in makespans],
        "requests_per_s": round(len(turns) / makespan, 3),
        "requests_per_s_per_round": [
            round(len(r["turns"]) / m, 3) for r, m in zip(rounds, makespans, strict=True)
        ],  # fmt: skip
        "launch_cpu_s": round(cpu_s, 2),
        "launch_cpu_ms_per_request": round(cpu_s / len(turns) * 1e3, 1),
        "launch_cpu_ms_per_request_per_round": [
            round(r["cpu_s"] / len(r["turns"]) * 1e3, 1) for r in rounds
        ],
        "prompt_tokens_per_s": round(prompt_tokens / makespan, 1),
        "generated_tokens_per_s": round(generated / makespan, 1),
        "ttft": percentiles(ttft, 1),
        "ttft_p50_ms_per_round": [p50(r["turns"]) for r in rounds],
        "ttft_first_turn_p50_ms": p50([t for t in turns if t["turn"] == 0]),
        "ttft_later_turns_p50_ms": p50([t for t in turns if t["turn"] > 0]),
        "latency": percentiles([t["latency_s"] for t in turns], 1),
        "prefix_cache_hit_rate": round(hit / queried, 4) if queried else 0.0,
        "prefix_cache_hit_tokens": hit,
        "prefix_cache_queried_tokens": queried,
        "prefilled_tokens": queried - hit,
        "replicas": replicas,
        "load_max_over_mean_requests": imbalance("requests"),
        "load_max_over_mean_prompt_tokens": imbalance("prompt_tokens"),
        "load_max_over_mean_prefilled_tokens": imbalance("prefilled_tokens"),
        "replicas_per_conversation_mean": round(
            sum(
                len({t["rank"] for t in turns if (t["round"], t["conversation"]) == c})
                for c in chats
            )
            / len(chats),
            3,
        ),  # fmt: skip
        "workload_digests": sorted({r["digest"] for r in rounds}),
        "ttft_s": [round(x, 4) for x in sorted(ttft)],
    }


def code_version() -> str | None:
    """The commit the launched code is (``+ uncommitted changes`` if its package or launch
    scripts differ from it), or None outside a git checkout."""
    try:
        git = ["git", "-C", ROOT]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "megatron_coord", "launch"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def known_policies() -> set[str]:
    """The --routing choices this checkout's launch accepts."""
    from megatron_coord.launch.arguments import add_replica_arguments

    parser = argparse.ArgumentParser()
    add_replica_arguments(parser)
    action = next(a for a in parser._actions if a.dest == "routing")
    return set(action.choices or ())


def target(name: str, value: float | None, goal: float, better: str, what: str) -> dict:
    """A target's measured value, its goal and by how much it is met (margin > 0) or missed."""
    if value is None or value != value:  # nan
        return {"target": name, "what": what, "goal": goal, "value": None, "met": None}
    margin = value / goal - 1 if better == "higher" else goal / value - 1
    return {
        "target": name,
        "what": what,
        "goal": f"{'>=' if better == 'higher' else '<='} {goal}",
        "value": round(value, 3),
        "met": margin >= 0,
        "margin": f"{margin:+.1%} ({'met' if margin >= 0 else 'missed'} by "
        f"{abs(value - goal):.3f})",
    }


def targets(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    pa, ll = configs.get("prefix_aware"), configs.get("least_loaded")
    ll_off = configs.get("least_loaded_no_cache")
    out = []
    if pa and ll_off:
        out.append(
            target(
                "throughput",
                pa["requests_per_s"] / ll_off["requests_per_s"],
                1.5,
                "higher",
                "prefix_aware (cache on) requests/s / least_loaded (cache off) requests/s",
            )
        )
    if pa and ll_off:
        out.append(
            target(
                "throughput_cpu",
                ll_off["launch_cpu_ms_per_request"] / pa["launch_cpu_ms_per_request"],
                1.5,
                "higher",
                "the same throughput ratio in CPU time, which other work on the machine "
                "disturbs far less than wall time: least_loaded (cache off) CPU ms per request / "
                "prefix_aware (cache on) CPU ms per request, the launch's processes",
            )
        )
    if pa and ll:
        out.append(
            target(
                "ttft_p50",
                pa["ttft"]["p50_ms"] / ll["ttft"]["p50_ms"],
                0.5,
                "lower",
                "prefix_aware TTFT p50 / least_loaded (cache on) TTFT p50",
            )
        )
    if pa:
        worst = max(pa["load_max_over_mean_requests"], pa["load_max_over_mean_prompt_tokens"])
        out.append(
            target(
                "balance",
                worst,
                1.3,
                "lower",
                "prefix_aware: max replica load / mean load (the worse of requests and prompt "
                "tokens served)",
            )
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--user-tokens", type=int, default=48, help="tokens per user turn")
    parser.add_argument("--reply-tokens", type=int, default=24, help="tokens per reply")
    parser.add_argument("--rate", type=float, default=16.0, help="conversation starts per s")
    parser.add_argument("--think", type=float, default=0.5, help="mean think time (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--kv-block-size", type=int, default=16)
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=1024,
        help="KV blocks per replica (0: the launch's default, max-batch-size x max-seq-len)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[c[0] for c in CONFIGS if c[0] != "prefix_aware_no_cache"],
        choices=[c[0] for c in CONFIGS],
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="run every configuration this many times"
    )
    parser.add_argument("--output", default=os.path.join(RESULTS, "prefix_routing.json"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if longest_prompt(args) + args.reply_tokens > 1024:
        parser.error("the last turn's prompt + reply exceed the default model's 1024 positions")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    policies = known_policies()
    wanted = [c for c in CONFIGS if c[0] in args.configs]
    left_out = [name for name, routing, _ in wanted if routing not in policies]
    systems, conversations = workload(args)
    runnable = [c for c in wanted if c[1] in policies]
    for name in left_out:
        print(f"{name}: its --routing is not in this checkout, left out", flush=True)
    started = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in runnable}
    for round_index in range(args.rounds):
        # Every other round in the reverse order, so drifting load from other work on the
        # machine hits the configurations alike.
        order = runnable if round_index % 2 == 0 else runnable[::-1]
        for name, routing, caching in order:
            print(f"round {round_index}: {name} (--routing {routing}, cache "
                  f"{'on' if caching else 'off'})", flush=True)  # fmt: skip
            launch = Launch(args, routing, caching)
            try:
                result = asyncio.run(
                    replay(launch.address, args, systems, conversations, launch.process.pid)
                )
            except BaseException:
                print(launch.output(), file=sys.stderr)
                raise
            finally:
                launch.stop()
            results[name].append(result)
            c = summarize([result], args)
            print(
                f"  {c['requests_per_s']} req/s ({c['launch_cpu_ms_per_request']} CPU ms per "
                f"request), TTFT p50 {c['ttft']['p50_ms']} ms p99 "
                f"{c['ttft']['p99_ms']} ms, hit rate {c['prefix_cache_hit_rate']}, requests "
                f"per replica {[r['requests'] for r in c['replicas']]}",
                flush=True,
            )
    configs = {
        name: {"routing": routing, "prefix_caching": caching, **summarize(results[name], args)}
        for name, routing, caching in runnable
    }
    per_round = [
        {
            "round": i,
            "targets": targets({name: summarize([results[name][i]], args) for name in results}),
        }
        for i in range(args.rounds)
    ]
    digests = {d for c in configs.values() for d in c["workload_digests"]}
    out = {
        "benchmark": "prefix_routing",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"host": platform.node(), "cpus": os.cpu_count()},
        "code": code_version(),
        "command": " ".join(["python", "benchmarks/prefix_routing.py", *(argv or sys.argv[1:])]),
        "workload": {
            "conversations": args.conversations,
            "turns": args.turns,
            "requests": args.conversations * args.turns,
            "system_prompts": args.system_prompts,
            "system_tokens": args.system_tokens,
            "user_tokens": args.user_tokens,
            "reply_tokens": args.reply_tokens,
            "longest_prompt_tokens": longest_prompt(args),
            "prompt_tokens_total": args.conversations
            * sum(
                args.system_tokens + (t + 1) * args.user_tokens + t * args.reply_tokens
                for t in range(args.turns)
            ),
            "prompts": "token ids (seeded random GPT-2 ids); each turn = system prompt + earlier "
            "user turns and the model's greedy replies + the new user turn",
            "arrivals": f"conversation starts Poisson at {args.rate}/s, think time before each "
            f"later turn exponential mean {args.think} s after the previous reply (closed loop "
            "per conversation), seed " + str(args.seed),
            "same_prompts_in_every_config": len(digests) == 1,
        },
        "launch": {
            "replicas": args.replicas,
            "tensor_parallel_size": 1,
            "model": "embedded default (4 layers, hidden 256, GPT-2 vocabulary, 1024 positions)",
            "torch_threads_per_rank": args.threads,
            "max_batch_size": args.max_batch_size,
            "kv_block_size": args.kv_block_size,
            "kv_blocks_per_replica": args.kv_blocks or "launch default",
            "kv_working_set_blocks": working_set_blocks(args),
        },
        "configs_left_out": left_out,
        "wall_s": round(time.monotonic() - started, 1),
        "targets": targets(configs),
        "targets_per_round": per_round,
        "configs": {k: {x: y for x, y in v.items() if x != "ttft_s"} for k, v in configs.items()},
        "ttft_s": {k: v["ttft_s"] for k, v in configs.items()},
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps({k: v for k, v in out.items() if k != "ttft_s"}, indent=1), flush=True)
    if not args.no_plot:
        import plot

        for path in plot.plot_prefix_routing(os.path.dirname(args.output)):
            print(path)


if __name__ == "__main__":
    main()
