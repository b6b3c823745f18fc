"""The generate job (launch/generate.py): serve a list of prompts through this launch's own
coordinator, then STOP every replica.

Global rank 0 runs an ``InferenceClient`` in a thread (its main thread runs its replica's
engine loop like every other rank's), submits every prompt, collects one completion (or the
error) per prompt, in prompt order, and sends STOP, which ends every rank's loop and the
coordinator.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .coordinator_process import COORDINATOR_START_TIMEOUT_S
from .replica import Replica, ReplicaOptions


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """``--prompt`` values, then the file's: a JSON list of strings, or one prompt per line."""
    import json

    out = list(prompts or [])
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            loaded = json.loads(text)
            if not all(isinstance(p, str) for p in loaded):
                raise ValueError(f"{prompts_file}: a JSON prompts file must be a list of strings")
            out += loaded
        else:
            out += [line for line in text.splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts: pass --prompt TEXT and/or --prompts-file FILE")
    return out


async def _generate_async(
    address: str, prompts: list[str], params: Any, progress: bool
) -> list[dict[str, Any]]:
    import asyncio

    from tqdm import tqdm

    from ..client import InferenceClient

    client = InferenceClient(address)
    await client.start()
    try:
        futures = [client.add_request(prompt, params) for prompt in prompts]
        with tqdm(total=len(futures), disable=not progress, unit="prompt") as bar:
            for done in asyncio.as_completed(futures):
                with contextlib.suppress(Exception):  # reported per prompt below
                    await done
                bar.update()
        return [f.exception() if f.exception() is not None else f.result() for f in futures]
    finally:
        await client.stop_engines()
        client.stop()


def _completion(prompt: str, record: dict[str, Any] | BaseException) -> dict[str, Any]:
    """One output entry: the record's fields, or the error that prompt got instead."""
    if isinstance(record, BaseException):
        return {"prompt": prompt, "error": str(record)}
    request = record["requests"][0] if "requests" in record else record
    out = {
        "prompt": prompt,
        "prompt_tokens": request["prompt_tokens"],
        "generated_text": request.get("generated_text"),
        "generated_tokens": request["generated_tokens"],
        "data_parallel_rank": request.get("data_parallel_rank"),
        "finish_reason": request.get("finish_reason"),
    }
    if request.get("generated_log_probs") is not None:
        out["generated_log_probs"] = request["generated_log_probs"]
    return out


def run_generate(
    options: ReplicaOptions,
    prompts: list[str],
    sampling_params: Any,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Serve ``prompts`` through the coordinator; rank 0 returns completions in prompt order.

    Rank 0 runs a client in a thread (the main thread runs its engine), submits every prompt,
    gathers the results and sends STOP, which ends every rank's loop and the coordinator.
    Other ranks return None.
    """
    import asyncio
    import threading

    replica = Replica(options)
    results: dict[str, Any] = {}

    def client_thread() -> None:
        try:
            if not replica.ready_event.wait(COORDINATOR_START_TIMEOUT_S):
                raise RuntimeError("the coordinator never became ready")
            records = asyncio.run(
                _generate_async(replica.address, prompts, sampling_params, progress)
            )
            results["completions"] = [
                _completion(p, r) for p, r in zip(prompts, records, strict=True)
            ]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            results["error"] = exc
            replica.server.request_shutdown()

    thread = None
    if replica.is_global_rank0:
        thread = threading.Thread(target=client_thread, name="generate-client", daemon=True)
        thread.start()
    replica.serve()
    if thread is None:
        return None
    # After STOP (a client's, or the end of a drain) the client has its answers; after a
    # signal that ended the loop at once it may wait forever on requests the stopped engines
    # will never finish, so give it a moment and leave it (a daemon).
    thread.join(60.0 if replica.server.stop_received else 2.0)
    if thread.is_alive():
        raise RuntimeError("generation interrupted before every prompt completed")
    if "error" in results:
        raise RuntimeError(f"generation failed: {results['error']!r}") from results["error"]
    return results["completions"]
