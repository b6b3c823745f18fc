"""The torchrun worker of tests/test_training_inference.py: a training script using
``TrainingInference`` over its own model, checking itself, one JSON report per rank.

Usage: torchrun --nproc-per-node 2 tests/_training_inference_worker.py MODE OUT CKPT TP

``MODE`` ``loop``: train a few steps (a cross-entropy step towards a fixed completion, gradients
averaged over the data-parallel ranks), generating between them, SPMD (each rank its own
prompts), then rank 0 alone. After each update it records, per prompt: the served greedy
tokens, those of a freshly built engine over a copy of the same weights, the served log-probs
and the training model's own (``token_log_probs``); the KV bytes before, during and after
each suspension; versions and spans. ``raise``: rank 1 raises inside its training step while
rank 0 waits in a training collective.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_coord import SamplingParams, TrainingInference
from megatron_coord.engine.engine import InferenceEngine
from megatron_coord.engine.tp_broadcast import NewRequest
from megatron_coord.models import training
from megatron_coord.models.checkpoint import load_model
from megatron_coord.models.llama import LlamaModel
from megatron_coord.parallel_state import initialize
from megatron_coord.tokenizer import load_tokenizer
from megatron_coord.training_inference import GenerationError

STEPS = 3
NEW_TOKENS = 6
TARGET = [11, 22, 33, 44, 55, 66]  # the completion the training step pulls towards
PROBE = [5, 6, 7]
# Longer than the coordinator's engine timeout (3 s): a parked replica must keep beating.
LONG_TRAINING_S = 4.0  # in every rank's prompts at every step: what each version makes of it
GREEDY = SamplingParams(
    temperature=0.0,
    top_k=1,
    num_tokens_to_generate=NEW_TOKENS,
    return_log_probs=True,
    skip_prompt_log_probs=True,
    ignore_eos=True,
)


def prompts_of(rank: int, step: int) -> list[list[int]]:
    """This rank's prompts at ``step`` (distinct per rank, so SPMD results are told apart)."""
    return [[100 + rank * 10 + i, 200 + step, 300 + i] for i in range(2 + rank)]


def fresh_greedy(model: LlamaModel, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of a new engine over a copy of ``model``'s weights (SPMD over the TP
    group: every TP rank runs it on the same prompts)."""
    copy = LlamaModel(model.config, model.state)
    copy.load_state_dict(model.state_dict())
    engine = InferenceEngine(copy, max_batch_size=len(prompts), prefix_caching=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(NewRequest(i, prompt, GREEDY, 0))
    out: dict[int, list[int]] = {}
    while engine.has_work:
        for record in engine.step().finished:
            request = record["requests"][0]
            out[request["request_id"]] = request["generated_tokens"]
    return [out[i] for i in range(len(prompts))]


def train_step(model, optimizer, params, prompts, dp_group) -> float:
    """One cross-entropy step towards TARGET after each prompt; gradients averaged over DP."""
    tokens = torch.tensor([p + TARGET for p in prompts])
    loss = -training.token_log_probs(model, tokens, first=len(prompts[0])).mean()
    optimizer.zero_grad()
    loss.backward()
    if dp_group is not None:
        for p in params:
            dist.all_reduce(p.grad, group=dp_group)
            p.grad /= dist.get_world_size(dp_group)
    optimizer.step()
    return loss.item()


def export_error(model, checkpoint: str) -> float:
    """Max difference of ``hf_tensors`` (whole tensors rebuilt from the shards; collective
    over the TP group) from the checkpoint's; inf if the names differ."""
    from safetensors.torch import load_file

    from megatron_coord.models.hf_export import hf_tensors

    reference = load_file(os.path.join(checkpoint, "model.safetensors"))
    ours = dict(hf_tensors(model))
    if set(ours) != set(reference):
        return float("inf")
    return max((ours[k] - reference[k]).abs().max().item() for k in ours)


def loop(llm: TrainingInference, model, rank: int, tp: int, checkpoint: str) -> dict:
    world = dist.get_world_size()
    dp_group = dist.new_group(list(range(world))) if tp == 1 and world > 1 else None
    params = training.set_trainable(model, "all")
    optimizer = torch.optim.SGD(params, lr=0.5)
    report: dict = {"kv": [], "steps": [], "versions": [], "rank0_only": None}
    first = rank - rank % tp  # every TP rank of a replica computes alike: on the group's
    for step in range(STEPS + 1):
        mine = prompts_of(rank, step) + [PROBE]
        records = llm.generate(mine, GREEDY)
        kv_serving = llm.kv_cache_bytes
        llm.suspend()
        kv_suspended = llm.kv_cache_bytes
        if step == 0:
            report["hf_export_error"] = export_error(model, checkpoint)
        if step == 1:
            time.sleep(LONG_TRAINING_S)  # a training phase the coordinator must sit out
        everyone = [None] * world
        dist.all_gather_object(everyone, list(zip(mine, records, strict=True)))
        items = sum(everyone[first : first + tp], [])
        fresh = fresh_greedy(model, [prompt for prompt, _ in items])
        entry = {"version": llm.weight_version, "records": []}
        for (prompt, record), expected in zip(items, fresh, strict=True):
            tokens = torch.tensor([prompt + record["generated_tokens"]])
            with torch.no_grad():
                own = training.token_log_probs(model, tokens, first=len(prompt))[0].tolist()
            entry["records"].append(
                {
                    "prompt": prompt,
                    "prompt_tokens": record["prompt_tokens"],
                    "generated_tokens": record["generated_tokens"],
                    "generated_text": record.get("generated_text"),
                    "fresh_tokens": expected,
                    "log_probs": record["generated_log_probs"],
                    "train_log_probs": own,
                    "weight_version_spans": record["weight_version_spans"],
                    "kv_version_spans": record["kv_version_spans"],
                    "data_parallel_rank": record.get("data_parallel_rank"),
                }
            )
        entry["mine"] = mine
        report["steps"].append(entry)
        if step < STEPS:
            group_prompts = [prompt for prompt, _ in items]
            entry["loss"] = train_step(model, optimizer, params, group_prompts, dp_group)
            result = llm.update_weights(str(step + 1))
            entry["update_ok"] = result["ok"]
        llm.resume()
        if step == 1:
            report["alive_after_long_training"] = [e["alive"] for e in llm.stats()["engines"]]
        report["kv"].append([kv_serving, kv_suspended, llm.kv_cache_bytes])
        report["versions"].append(llm.weight_version)
    # Rank 0 alone generates; the others go straight on to the next collective call.
    if rank == 0:
        records = llm.generate([[7, 8, 9], "hello"], {"num_tokens_to_generate": 4, "top_k": 1})
        report["rank0_only"] = [r["generated_tokens"] for r in records]
    report["bad_input"] = bad_input(llm)
    llm.suspend()
    try:
        llm.generate([[1, 2, 3]], GREEDY)
    except RuntimeError as exc:
        report["bad_input"]["generate_while_suspended"] = str(exc)
    report["update_while_suspended"] = llm.update_weights("final")["version"]
    llm.resume()
    report["final_version"] = llm.weight_version
    return report


def bad_input(llm: TrainingInference) -> dict:
    """Bad input gets a clear error; a good prompt beside a bad one still gets its record."""
    out = {}
    try:
        llm.generate([[1, 2, 3], [10**7]], GREEDY)  # a token id past the vocabulary
    except GenerationError as exc:
        out["failed"] = sorted(exc.errors)
        out["kept"] = [r is not None for r in exc.records]
        out["message"] = str(exc)
    for name, call in (
        ("params", lambda: llm.generate([[1]], {"temperature": -1.0})),
        ("version", lambda: llm.update_weights("")),
        ("mode", lambda: llm.update_weights("v", mode="sometimes")),
        ("prompts", lambda: llm.generate("not a list")),
    ):
        try:
            call()
        except (ValueError, TypeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def failing(llm: TrainingInference, rank: int, out: str) -> None:
    """Rank 1 raises inside its training step; rank 0 waits in a training collective."""
    llm.generate([[1, 2, 3]], GREEDY)
    llm.suspend()
    if rank == 1:
        with open(os.path.join(out, "raised_at"), "w") as f:
            f.write(repr(time.time()))
        raise RuntimeError("a bug in the training step")
    dist.all_reduce(torch.ones(1))  # never completes: rank 1 is gone


def remote(llm: TrainingInference, model, rank: int) -> dict:
    """Replicas elsewhere: generate, train, send the weights (update_weights), generate."""
    dp_group = dist.new_group(list(range(dist.get_world_size())))
    params = training.set_trainable(model, "all")
    optimizer = torch.optim.SGD(params, lr=0.5)
    report: dict = {"versions": [llm.weight_version], "steps": []}
    mine = prompts_of(rank, 0) + [PROBE]
    for step in range(2):
        records = llm.generate(mine, GREEDY)
        llm.suspend()
        fresh = fresh_greedy(model, mine)
        entry = {"records": []}
        for prompt, record, expected in zip(mine, records, fresh, strict=True):
            tokens = torch.tensor([prompt + record["generated_tokens"]])
            with torch.no_grad():
                own = training.token_log_probs(model, tokens, first=len(prompt))[0].tolist()
            entry["records"].append(
                {
                    "generated_tokens": record["generated_tokens"],
                    "fresh_tokens": expected,
                    "log_probs": record["generated_log_probs"],
                    "train_log_probs": own,
                    "weight_version_spans": record["weight_version_spans"],
                }
            )
        report["steps"].append(entry)
        if step == 0:
            entry["loss"] = train_step(model, optimizer, params, mine, dp_group)
            result = llm.update_weights("sent-1")
            entry["update"] = {k: result.get(k) for k in ("published", "version")}
        llm.resume()
        report["versions"].append(llm.weight_version)
    return report


def main() -> None:
    mode, out, checkpoint, tp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    replicas = sys.argv[5] if len(sys.argv) > 5 else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    state = initialize(tp)
    model = load_model(checkpoint, state)
    tokenizer = load_tokenizer(checkpoint)
    rank = state.rank
    version = "0" if replicas is None else "initial"  # a serve launch's first label
    with TrainingInference(
        model,
        tokenizer,
        tp,
        weights_version=version,
        max_batch_size=8,
        kv_cache_tokens=512,
        replicas=replicas,
    ) as llm:
        with open(os.path.join(out, f"pids.rank{rank}"), "w") as f:
            coordinator = llm.coordinator.pid if llm.coordinator is not None else None
            json.dump({"pid": os.getpid(), "coordinator": coordinator}, f)
        if mode == "raise":
            failing(llm, rank, out)
            return
        report = remote(llm, model, rank) if replicas else loop(llm, model, rank, tp, checkpoint)
        coordinator = llm.coordinator
    report["coordinator_alive_after"] = coordinator is not None and coordinator.is_alive()
    with open(os.path.join(out, f"report.rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


# No ``if __name__ == "__main__"`` guard, as many torchrun scripts are written: the coordinator
# process TrainingInference spawns must not run this script again.
main()
