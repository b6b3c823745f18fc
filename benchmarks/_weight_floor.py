"""The raw broadcast floor of benchmarks/weight_update.py, and a diagnostic beside it.

``floor_tries`` starts a torchrun group of its own (a trainer + N receiving ranks, the shape of
the serving launch's transfer group) running this file: rank 0 broadcasts the checkpoint's
Hugging Face tensors with plain torch.distributed calls, tensor by tensor, as one flat buffer,
and as that buffer in chunks of the sender's bucket size (an all-reduce ends each try, so every
rank has everything); ``summarize_floor`` takes the fastest kind's median as the floor.

Beside it, in the same processes and not part of the floor: what a new process group costs (an
update makes one), and the update's own transfer (``WeightSender`` to ``receive_weights`` into
a TP 1 model of the checkpoint, shard checks and copies included) without a coordinator or a
serving loop around it, with its first receiver's time split. Comparing the two tells the
transfer's own cost from the coordinator's and the serving loop's.

    torchrun --nproc-per-node 3 benchmarks/_weight_floor.py --model DIR --floor-out F.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLOOR_KINDS = ("per_tensor", "flat", "chunked")  # chunked: in the sender's bucket size
DIAGNOSTICS = ("group_setup", "weight_sender")  # beside the floor, not part of it


def floor_worker(args: argparse.Namespace) -> None:
    """One rank of the floor group (under torchrun): rank 0 is the trainer and broadcasts the
    checkpoint's tensors; the others receive them into tensors of their own."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from megatron_coord.weights import DEFAULT_BUCKET_BYTES

    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = list(load_file(os.path.join(args.model, "model.safetensors")).values())
    tensors = [t.to(device) if rank == 0 else torch.empty_like(t, device=device) for t in tensors]
    total = sum(t.numel() * t.element_size() for t in tensors)
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    if rank == 0:
        flat.copy_(torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]))
    done = torch.zeros(1, device=device)
    chunk = (args.bucket_bytes or DEFAULT_BUCKET_BYTES) // 2  # what one of its buckets holds
    pieces = {
        "per_tensor": tensors,
        "flat": [flat],
        "chunked": [flat[start : start + chunk] for start in range(0, total, chunk)],
    }

    def settle() -> None:
        dist.all_reduce(done)  # every rank got everything before it
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {kind: [] for kind in (*FLOOR_KINDS, *DIAGNOSTICS)}
    transfer = SenderOutsideServing(args, rank, world, device)
    settle()
    for index in range(1 + args.floor_repeat):  # the first try warms up, not counted
        for kind in FLOOR_KINDS:
            settle()
            started = time.perf_counter()
            for tensor in pieces[kind]:
                dist.broadcast(tensor, 0)
            settle()
            if index:
                times[kind].append(time.perf_counter() - started)
        started = time.perf_counter()  # what a fresh group (one per update) costs
        group = dist.new_group(list(range(world)), backend=args.backend)
        dist.broadcast(done, 0, group=group)
        settle()
        if index:
            times["group_setup"].append(time.perf_counter() - started)
        dist.destroy_process_group(group)
        if transfer.ready:
            settle()
            started = time.perf_counter()
            transfer.once(f"floor-{index}")
            settle()
            if index:
                times["weight_sender"].append(time.perf_counter() - started)
    splits: list[Any] = [None] * world
    dist.all_gather_object(splits, transfer.splits[1:] if transfer.ready else [])
    if rank == 0:
        out = {"bytes": total, "tensors": len(tensors), "world_size": world} | times
        out["receiver_split"] = splits[1]  # the first receiver's, per counted try
        with open(args.floor_out, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


class SenderOutsideServing:
    """A diagnostic beside the floor, in the floor group's processes: the update's own transfer
    (a ``WeightSender`` on rank 0; on the others ``receive_weights`` into a TP 1 model of the
    checkpoint, shard checks and copies included), without a coordinator or a serving loop
    around it: what the bucketed transfer itself costs against the raw broadcasts (gloo only;
    every receiver holds the whole model, as a TP 1 replica does)."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: Any) -> None:
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self.ready = args.backend == "gloo"
        if not self.ready:
            return
        from safetensors.torch import load_file

        from megatron_coord.models.checkpoint import load_model
        from megatron_coord.parallel_state import single_process_state
        from megatron_coord.weights import WeightSender

        spec: list[Any] = [None]
        if rank == 0:
            options = {"bucket_bytes": args.bucket_bytes} if args.bucket_bytes else {}
            self.sender = WeightSender(backend="gloo", timeout_s=120.0, **options)
            self.tensors = list(load_file(os.path.join(args.model, "model.safetensors")).items())
            spec[0] = self.sender.source_spec()
        else:
            self.model = load_model(args.model, single_process_state())
            self._time_receiver()
        dist.broadcast_object_list(spec, 0)
        self.spec = spec[0]
        self.splits: list[dict[str, float]] = []  # a receiver's, per try

    def _time_receiver(self) -> None:
        """Note, in this process only, when the receiver's group was joined, the manifest in,
        and how long its copies into the model took (the rest of the buckets' time: waiting)."""
        from megatron_coord.weights import receiver

        marks = self.marks = {"copy": 0.0}

        class TimedGroup(receiver.TransferGroup):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                marks["group"] = time.monotonic()

            def broadcast_bytes(self, data: bytes | None) -> bytes:
                out = super().broadcast_bytes(data)
                marks["manifest"] = time.monotonic()
                return out

            def close(self) -> None:
                marks["close"] = time.monotonic()
                super().close()

        write_bucket = receiver.ShardWriter.write_bucket

        def timed_write(writer: Any, *args: Any) -> None:
            started = time.monotonic()
            write_bucket(writer, *args)
            marks["copy"] += time.monotonic() - started

        receiver.TransferGroup = TimedGroup
        receiver.ShardWriter.write_bucket = timed_write

    def once(self, label: str) -> None:
        if self.rank == 0:
            self.sender.send(self.tensors, self.world, version=label)
            return
        from megatron_coord.weights.receiver import TransferProgress, receive_weights

        marks = self.marks
        marks.update(copy=0.0, start=time.monotonic())
        receive_weights(
            self.model, self.spec, label, self.rank, self.world, 120.0,
            lambda problems: problems, TransferProgress(),
        )  # fmt: skip
        done = time.monotonic()
        self.splits.append(
            {
                "join_s": marks["group"] - marks["start"],  # the store, the new group
                "manifest_s": marks["manifest"] - marks["group"],
                "buckets_s": marks["close"] - marks["manifest"],
                "of_which_copy_s": marks["copy"],
                "close_s": done - marks["close"],
            }
        )


def floor_tries(args: argparse.Namespace, model: str, receivers: int) -> dict[str, Any]:
    """Run the floor group (trainer + ``receivers`` ranks) as a torchrun job of its own: its
    tries' seconds per kind."""
    with tempfile.TemporaryDirectory(prefix="weight_update_floor_") as folder:
        out = os.path.join(folder, "floor.json")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(1 + receivers),
            "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
            os.path.abspath(__file__), "--model", model,
            "--floor-repeat", str(args.floor_repeat), "--floor-out", out,
            "--backend", args.backend,
        ]  # fmt: skip
        if args.bucket_bytes:
            command += ["--bucket-bytes", str(args.bucket_bytes)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if run.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"the floor group failed ({run.returncode}):\n{run.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def summarize_floor(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The floor over every run's tries (one run before the timed updates, one after, so a
    shared host's drift weighs on both sides): the faster kind's median."""
    kinds = (*FLOOR_KINDS, *DIAGNOSTICS)
    tries = {kind: [t for run in runs for t in run.get(kind, [])] for kind in kinds}
    kinds = tuple(kind for kind in kinds if tries[kind])
    medians = {kind: statistics.median(tries[kind]) for kind in kinds}
    fastest = min(FLOOR_KINDS, key=medians.__getitem__)
    total = runs[0]["bytes"]
    return {
        "broadcast_floor_s": round(medians[fastest], 4),
        "floor_kind": fastest,
        "with_group_setup_s": round(medians[fastest] + medians["group_setup"], 4),
        "world_size": runs[0]["world_size"],
        "bytes": total,
        "tensors": runs[0]["tensors"],
        "median_s": {kind: round(value, 4) for kind, value in medians.items()},
        "median_s_per_run": [round(statistics.median(run[fastest]), 4) for run in runs],
        "all_s": {kind: [round(t, 4) for t in tries[kind]] for kind in kinds},
        "gbit_per_s": round(total * 8 / medians[fastest] / 1e9, 2),
    } | _receiver_split(runs)


def _receiver_split(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The diagnostic transfer's time on its first receiver, split (medians over the tries)."""
    splits = [split for run in runs for split in run.get("receiver_split") or []]
    if not splits:
        return {}
    return {
        "weight_sender_receiver_split_s": {
            key: round(statistics.median(split[key] for split in splits), 4) for key in splits[0]
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--floor-repeat", type=int, default=10, help="counted tries")
    parser.add_argument("--floor-out", required=True, help="rank 0 writes the tries here")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--bucket-bytes", type=int, default=None, help="the sender's")
    floor_worker(parser.parse_args())


if __name__ == "__main__":
    main()
