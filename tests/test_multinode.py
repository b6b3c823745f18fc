"""Multi-node launches on one machine: two torchrun agents ("nodes") form one world over
loopback, global rank 0 spawns the coordinator, and the replicas of both nodes serve through it.

torchrun's c10d rendezvous ignores ``--node-rank`` (it orders the agents itself), so global rank
0, and with it the coordinator, may land on either node; the static rendezvous honours
``--node-rank``. Both are exercised. Every process binds and dials 127.0.0.1 only
(``--local-addr`` sets MASTER_ADDR; GLOO_SOCKET_IFNAME keeps gloo on the loopback device),
and on CPU even where a GPU is present (see TwoNodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from _procs import ROOT, cmdline, free_port, launch_env, processes_with
from test_engine import hf_greedy

pytestmark = pytest.mark.torchrun

PROMPTS = ["Hello world", "The quick brown fox", "abc", "Data parallel inference", "x y z"]
N_TOKENS = 6
LAUNCH_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def expected(checkpoint, tokenizer) -> list[list[int]]:
    """transformers' greedy tokens for PROMPTS: what every replica must produce."""
    return hf_greedy(checkpoint, [tokenizer.tokenize(p) for p in PROMPTS], N_TOKENS)


def _torchrun_node(
    node_rank: int, nproc: int, rdzv: str, port: int, run_id: str, script: str, *args: str
) -> list[str]:
    """One agent's command line: ``--nnodes 2 --node-rank K`` and a rendezvous on loopback."""
    if rdzv == "c10d":
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                      "--rdzv-id", run_id]  # fmt: skip
    else:  # static: node 0 hosts the store at MASTER_ADDR:MASTER_PORT
        rendezvous = ["--rdzv-backend", "static", "--master-addr", "127.0.0.1",
                      "--master-port", str(port)]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
        "--node-rank", str(node_rank), "--nproc-per-node", str(nproc), *rendezvous,
        "--local-addr", "127.0.0.1", os.path.join(ROOT, "launch", script), *args,
    ]  # fmt: skip


class TwoNodes:
    """Two torchrun agents of one launch, each with its own log and node marker in its env."""

    def __init__(self, tmp_path: Path, nproc: int, rdzv: str, script: str, *args: str) -> None:
        self.marker = uuid.uuid4().hex
        self.node_markers = [f"{self.marker}-node{k}" for k in range(2)]
        self.logs = [tmp_path / f"node{k}-{self.marker}.log" for k in range(2)]
        port, run_id = free_port(), f"multinode-{self.marker}"
        self.agents = []
        for k in range(2):
            env = launch_env(self.marker, tmp_path)
            env["MEGATRON_COORD_TEST_NODE"] = self.node_markers[k]
            env["GLOO_SOCKET_IFNAME"] = "lo"
            # Both "nodes" share this machine's GPUs, where LOCAL_RANK 0 of each would pick the
            # same GPU (NCCL refuses two ranks on one device): the launch runs on CPU and gloo.
            env["CUDA_VISIBLE_DEVICES"] = ""
            # Per-node arguments: "{node}" in an argument becomes this node's rank.
            node_args = [a.replace("{node}", str(k)) for a in args]
            command = _torchrun_node(k, nproc, rdzv, port, run_id, script, *node_args)
            with open(self.logs[k], "w") as log:
                self.agents.append(
                    subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
                )

    def output(self) -> str:
        return "\n".join(
            f"--- node {k}\n{log.read_text()[-4000:]}" for k, log in enumerate(self.logs)
        )

    def wait(self) -> list[int]:
        """Both agents' exit codes."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        return [agent.wait(max(1.0, deadline - time.monotonic())) for agent in self.agents]

    def wait_for_file(self, path: Path) -> str:
        """Poll for a file that global rank 0 writes; fail at once if an agent exits first."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not path.exists():
            exited = [a.returncode for a in self.agents if a.poll() is not None]
            assert not exited, f"an agent exited ({exited}) early:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {path.name}:\n{self.output()}"
            time.sleep(0.1)
        return path.read_text()

    def ranks_by_node(self) -> list[set[int]]:
        """The global RANK of every worker process, grouped by the node that started it."""
        found: list[set[int]] = [set(), set()]
        for pid in processes_with(self.marker):
            if "spawn_main" in cmdline(pid):
                continue  # the coordinator process (it inherits rank 0's environment)
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(
                        item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item
                    )
            except OSError:
                continue
            if b"RANK" not in env:
                continue  # an agent, not a worker
            node = self.node_markers.index(env[b"MEGATRON_COORD_TEST_NODE"].decode())
            found[node].add(int(env[b"RANK"]))
        return found

    def kill(self) -> None:
        """After a failure: end the agents, then any worker a killed agent left behind (only
        processes carrying this launch's marker). A passing test finds nothing to end here."""
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        for pid in processes_with(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("rdzv", ["c10d", "static"])
def test_generate_two_nodes_one_world(tmp_path, checkpoint, tokenizer, expected, rdzv):
    """2 nodes x 1 rank, TP=1: two replicas, one per node, answer through one coordinator."""
    outputs = [tmp_path / f"out-node{k}.json" for k in range(2)]
    nodes = TwoNodes(
        tmp_path, 1, rdzv, "generate.py", "--model", checkpoint,
        *[a for p in PROMPTS for a in ("--prompt", p)],
        "--num-tokens-to-generate", str(N_TOKENS), "--top-k", "1",
        "--output-json", str(tmp_path / "out-node{node}.json"),
    )  # fmt: skip
    try:
        codes = nodes.wait()
        leftovers = processes_with(nodes.marker)  # before kill() ends any straggler
    finally:
        nodes.kill()
    assert codes == [0, 0], nodes.output()
    assert leftovers == []
    # Only global rank 0 (the client's rank) writes completions.
    written = [k for k, path in enumerate(outputs) if path.exists()]
    assert len(written) == 1, nodes.output()
    if rdzv == "static":
        assert written == [0]  # the static rendezvous keeps --node-rank: node 0 is global rank 0

    completions = json.loads(outputs[written[0]].read_text())
    assert [c["prompt"] for c in completions] == PROMPTS
    for completion, prompt, tokens in zip(completions, PROMPTS, expected, strict=True):
        assert completion["prompt_tokens"] == tokenizer.tokenize(prompt)
        assert completion["generated_tokens"] == tokens
        assert completion["generated_text"] == tokenizer.detokenize(tokens)
    # One rank per node, so data-parallel rank k is node k's (by rendezvous order): both served.
    assert {c["data_parallel_rank"] for c in completions} == {0, 1}


async def _serve_session(address: str, tokenizer, expected: list[list[int]]) -> set[int]:
    """Greedy requests from an outside client; returns the data-parallel ranks that answered."""
    from megatron_coord.client import InferenceClient

    client = InferenceClient(address)
    await client.start()
    greedy = {"top_k": 1, "num_tokens_to_generate": N_TOKENS}
    ranks: set[int] = set()
    for _ in range(2):  # two rounds: every replica gets requests under any routing policy
        records = await asyncio.wait_for(
            asyncio.gather(*(client.add_request(p, greedy) for p in PROMPTS)), 120
        )
        for record, prompt, tokens in zip(records, PROMPTS, expected, strict=True):
            (request,) = record["requests"]
            assert request["prompt_tokens"] == tokenizer.tokenize(prompt)
            assert request["generated_tokens"] == tokens
            ranks.add(request["data_parallel_rank"])
    await asyncio.wait_for(client.stop_engines(), 60)
    client.stop()
    return ranks


def test_serve_two_nodes_tp2_outside_client(tmp_path, checkpoint, tokenizer, expected):
    """2 nodes x 2 ranks, TP=2: one replica per node (TP inside the node); a client outside
    the launch reaches the coordinator, both nodes' replicas answer, STOP ends everything."""
    address_file = tmp_path / "coordinator-address"
    nodes = TwoNodes(
        tmp_path, 2, "c10d", "serve.py", "--model", checkpoint, "--tensor-parallel-size", "2",
        "--address-file", str(address_file),
    )  # fmt: skip
    try:
        address = nodes.wait_for_file(address_file)
        assert address.startswith("tcp://127.0.0.1:")
        by_node = nodes.ranks_by_node()
        served = asyncio.run(_serve_session(address, tokenizer, expected))
        codes = nodes.wait()
        leftovers = processes_with(nodes.marker)  # before kill() ends any straggler
    finally:
        nodes.kill()
    assert codes == [0, 0], nodes.output()
    assert leftovers == []
    # Each node runs one contiguous pair of global ranks, i.e. one whole TP group.
    assert sorted(map(sorted, by_node)) == [[0, 1], [2, 3]], by_node
    replica_of_node = [{rank // 2 for rank in ranks} for ranks in by_node]
    assert all(len(r) == 1 for r in replica_of_node)
    assert served == replica_of_node[0] | replica_of_node[1] == {0, 1}
