"""A prefix-sharing workload for the prefix-cache tests, at TP=1 (test_prefix_cache.py) and
TP=2 (_prefix_cache_tp_worker.py): the same prompts, run in waves, on an InferenceEngine.

Block size 16. Wave 1 computes a 40-token shared prefix twice in one step (both miss); wave 2
repeats a 48-token prompt (an exact multiple of the block size, fully cached: its last block is
recomputed for the logits), and continues the prefix with new suffixes, in one batch with a
prompt that shares nothing; wave 3 is a second chat turn: the first prompt, its answer and a new
question, so it reuses blocks named from generated tokens.
"""

from __future__ import annotations

import random
from typing import Any

from megatron_coord.engine import InferenceEngine
from megatron_coord.engine.tp_broadcast import NewRequest
from megatron_coord.sampling_params import SamplingParams

BLOCK = 16
NEW_TOKENS = 20  # the first prompt (48) then fills a 4th block with generated tokens


def prompts() -> tuple[list[int], list[list[int]], list[list[int]]]:
    """(shared prefix, wave 1, wave 2)."""
    rng = random.Random(7)
    ids = lambda n: [rng.randrange(50000) for _ in range(n)]  # noqa: E731
    prefix = ids(40)
    first = [prefix + ids(8), prefix + ids(13)]  # 48 = 3 blocks exactly, and 53
    second = [list(first[0]), prefix + ids(3), ids(29), prefix[:32] + ids(20)]
    return prefix, first, second


def _params(**extra: Any) -> SamplingParams:
    return SamplingParams(top_k=1, num_tokens_to_generate=NEW_TOKENS, termination_id=-1, **extra)


def run_wave(engine: InferenceEngine, batch: list[list[int]], first_id: int) -> list[dict]:
    """Submit ``batch`` at once and step until all finished; records in submission order."""
    for i, prompt in enumerate(batch):
        engine.add_request(NewRequest(first_id + i, prompt, _params(), 0))
    records: dict[int, dict] = {}
    prefilled = 0
    for _ in range(500):
        if not engine.has_work:
            break
        result = engine.step()
        prefilled += result.prefill_tokens
        for record in result.finished:
            (request,) = record["requests"]
            records[request["request_id"]] = request
    assert not engine.has_work
    out = [records[first_id + i] for i in range(len(batch))]
    out[0]["wave_prefill_tokens"] = prefilled
    return out


def run_workload(engine: InferenceEngine) -> dict[str, Any]:
    """Run the three waves; generated tokens per wave, prefilled tokens, cache stats."""
    _, first, second = prompts()
    waves = [first, second]
    outputs, prefilled = [], []
    for w, batch in enumerate(waves):
        records = run_wave(engine, batch, 100 * w)
        outputs.append([r["generated_tokens"] for r in records])
        prefilled.append(records[0]["wave_prefill_tokens"])
    turn = first[0] + outputs[0][0] + [11, 22, 33, 44, 55]
    records = run_wave(engine, [turn], 300)
    outputs.append([records[0]["generated_tokens"]])
    prefilled.append(records[0]["wave_prefill_tokens"])
    return {"outputs": outputs, "prefilled": prefilled, "stats": engine.blocks.stats()}
