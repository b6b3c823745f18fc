"""Megatron-core 0.19.2's own InferenceClient against our coordinator, in its own process (0.19
is on this process's path only: ``megatron019.environment()``). Prints one JSON line.

``requests ADDRESS [--count N] [--stop] [--shutdown]``: N requests (text and token prompts;
every other one deserialized into 0.19's classes), then PAUSE, UNPAUSE, PAUSE and, with
``--stop``, STOP; with ``--shutdown``, SHUTDOWN.
``epoch ADDRESS``: a request, SET_GENERATION_EPOCH 9, a request, a long request followed at
once by SET_GENERATION_EPOCH 10, a request; reports each reply's policy_epoch and
kv_cache_epoch (0.19's DynamicInferenceRequest fields), then PAUSE and STOP.
``bad ADDRESS``: bad input on a raw socket after a 0.19 handshake, then a request; reports every
header the coordinator sent back.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time

import msgpack
import zmq
from megatron.core.inference.headers import Headers
from megatron.core.inference.inference_client import InferenceClient
from megatron.core.inference.inference_request import DynamicInferenceRequest
from megatron.core.inference.sampling_params import SamplingParams


def _summary(reply) -> dict:
    if isinstance(reply, DynamicInferenceRequest):
        return {
            "class": type(reply).__name__,
            "prompt": reply.prompt,
            "generated_text": reply.generated_text,
            "generated_tokens": list(reply.generated_tokens),
            "status": reply.status.name,
            "events": [e.type.name for e in reply.events],
        }
    return {
        "class": "dict",
        "prompt": reply.get("prompt"),
        "generated_text": reply["generated_text"],
        "generated_tokens": reply["generated_tokens"],
        "status": reply["status"],
        "events": [e["type"] for e in reply.get("events") or []],
    }


async def run_requests(
    address: str, count: int, stop: bool, tokens: int, shutdown: bool = False
) -> dict:
    raw_client = InferenceClient(address)
    typed_client = InferenceClient(address, deserialize=True)
    raw_client.start()
    typed_client.start()
    params = SamplingParams(num_tokens_to_generate=tokens, top_k=1)
    futures = []
    for i in range(count):
        client = typed_client if i % 2 else raw_client
        prompt = f"prompt {i}" if i % 4 < 2 else [72, 105, 33 + i]
        futures.append(client.add_request(prompt, params))
    replies = await asyncio.gather(*futures)
    typed_client.pause_engines()
    typed_client.unpause_engines()
    typed_client.pause_engines()
    await asyncio.sleep(0.5)
    if stop:
        typed_client.stop_engines()
        await asyncio.sleep(0.5)
    if shutdown:
        typed_client.shutdown_coordinator()
        await asyncio.sleep(0.2)
    # A reply the client cannot decode would have ended its listener task.
    alive = not raw_client.listener_task.done() and not typed_client.listener_task.done()
    raw_client.stop()
    typed_client.stop()
    fields = [f.name for f in dataclasses.fields(DynamicInferenceRequest)]
    return {"replies": [_summary(r) for r in replies], "listeners_alive": alive, "fields": fields}


def run_bad(address: str) -> dict:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(address)
    pack = msgpack.packb
    sock.send(pack([Headers.CONNECT.value]))
    assert sock.poll(10000), "no CONNECT_ACK"
    seen = [msgpack.unpackb(sock.recv())[0]]
    params = SamplingParams(num_tokens_to_generate=3).serialize()
    for frame in (
        b"\xc1 not msgpack",
        pack([99]),
        pack([Headers.SUBMIT_REQUEST.value]),  # no fields
        pack([Headers.SUBMIT_REQUEST.value, 7, "", params]),  # empty prompt: FAILED record
        pack([Headers.SUBMIT_REQUEST.value, 8, "x", {"no_such_param": 1}]),  # FAILED record
        pack([Headers.UNPAUSE.value]),  # not paused: ignored, as 0.19's coordinator does
        pack([Headers.SET_GENERATION_EPOCH.value, "not an int"]),
        pack([Headers.PAUSE.value, "extra"]),
        pack([Headers.ENGINE_REPLY.value, []]),  # an engine's message from a client
        pack([101, {"data_parallel_rank": 0}]),  # our REGISTER from a 0.19 client
        pack([Headers.SUBMIT_REQUEST.value, 9, "ok", params]),
        pack([Headers.SUBMIT_REQUEST.value, 9, "ok", params]),  # duplicate id: no reply
    ):
        sock.send(frame)
    replies = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(replies) < 3:
        if sock.poll(200):
            message = msgpack.unpackb(sock.recv(), raw=False)
            seen.append(message[0])
            if message[0] == Headers.ENGINE_REPLY.value:
                replies[message[1]] = message[2]
    while sock.poll(1000):  # anything else it would send
        seen.append(msgpack.unpackb(sock.recv(), raw=False)[0])
    sock.close(0)
    context.term()
    # A typed client after all that: deserializes a FAILED record too.
    return {
        "headers": seen,
        "replies": {str(k): _summary(v) for k, v in replies.items()},
        "typed_failed": asyncio.run(_typed_failed(address)),
    }


async def _typed_failed(address: str) -> dict:
    client = InferenceClient(address, deserialize=True)
    client.start()
    failed = await client.add_request("", SamplingParams(num_tokens_to_generate=2))
    ok = await client.add_request("fine", SamplingParams(num_tokens_to_generate=2))
    client.stop()
    message = next(e.payload.message for e in failed.events if e.payload is not None)
    return {"failed": _summary(failed), "message": message, "ok": _summary(ok)}


async def run_epochs(address: str, tokens: int) -> dict:
    client = InferenceClient(address, deserialize=True)
    client.start()
    short = SamplingParams(num_tokens_to_generate=tokens, top_k=1)
    long = SamplingParams(num_tokens_to_generate=40, top_k=1)
    replies = [await client.add_request([72, 105, 33], short)]
    client.set_generation_epoch(9)
    replies.append(await client.add_request([72, 105, 34], short))
    straddling = client.add_request([72, 105, 35], long)
    client.set_generation_epoch(10)
    replies.append(await straddling)
    replies.append(await client.add_request([72, 105, 36], short))
    client.pause_engines()  # 0.19's engines stop only once paused
    await asyncio.sleep(0.2)
    client.stop_engines()
    await asyncio.sleep(0.5)
    client.stop()
    return {
        "replies": [
            {
                "class": type(r).__name__,
                "policy_epoch": r.policy_epoch,
                "kv_cache_epoch": r.kv_cache_epoch,
                "generated_length": len(r.generated_tokens),
            }
            for r in replies
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["requests", "bad", "epoch"])
    parser.add_argument("address")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--stop", action="store_true")
    parser.add_argument("--shutdown", action="store_true", help="then SHUTDOWN the coordinator")
    args = parser.parse_args()
    if args.scenario == "requests":
        scenario = run_requests(args.address, args.count, args.stop, args.tokens, args.shutdown)
        result = asyncio.run(asyncio.wait_for(scenario, 120))
    elif args.scenario == "epoch":
        result = asyncio.run(asyncio.wait_for(run_epochs(args.address, args.tokens), 120))
    else:
        result = run_bad(args.address)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
