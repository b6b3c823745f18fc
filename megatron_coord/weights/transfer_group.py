"""The weight-transfer group: trainer ranks and every serving rank, over the trainer's TCPStore.

A group of its own (``ProcessGroupGloo`` on CPU, ``ProcessGroupNCCL`` on CUDA), created
explicitly over a ``PrefixStore`` of the store the trainer hosts, never the default group: the
serving ranks have their torchrun world already, the trainer has its own, and the transfer
spans both. Ranks 0..T-1 are the trainer's, then each replica's block of ``tp_size`` ranks
(the coordinator assigns ``first_rank``).

Rendezvous. Each update gets a fresh prefix named by its version label, so a failed transfer
never leaves keys in the way of the next. The receivers know the label (their UPDATE_WEIGHTS
says it); a trainer that was not told it reads it from the store, where every receiver writes
it before joining (``LABEL_KEY``): labels are unique per update, so the trainer waits for one
it has not sent yet.

Every operation is bounded by the update's timeout; a peer that dies closes its connections,
which fails the waiting collectives at once.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

KEY_ROOT = "megatron_coord/weights"
LABEL_KEY = f"{KEY_ROOT}/label"
_POLL_S = (0.001, 0.05)  # first and longest wait between looks at the store


def resolve_backend(backend: str | None) -> str:
    """``None``: NCCL where CUDA is, else gloo."""
    if backend is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None, not {backend!r}")
    return backend


def connect_store(host: str, port: int, timeout_s: float, is_master: bool = False) -> Any:
    """The trainer's TCPStore (``is_master``: host it; port 0 picks a free one)."""
    return dist.TCPStore(
        host,
        port,
        None,
        is_master,
        timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def announce_label(store: Any, label: str) -> None:
    """A receiver says which update it joins (for a trainer that was not told)."""
    store.set(LABEL_KEY, label)


def await_label(store: Any, sent: set[str], timeout_s: float) -> str:
    """The label of the next update: the first announced one not in ``sent``."""
    deadline = time.monotonic() + timeout_s
    pause = _POLL_S[0]
    while True:
        if store.check([LABEL_KEY]):
            label = store.get(LABEL_KEY).decode()
            if label not in sent:
                return label
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no replica joined a weight transfer within {timeout_s:g} s (was the update "
                "sent to the coordinator, and did it answer WEIGHT_TRANSFER_READY?)"
            )
        time.sleep(pause)
        pause = min(pause * 2, _POLL_S[1])


def forget_label(store: Any) -> None:
    """After a transfer: the announcement is used up."""
    store.delete_key(LABEL_KEY)


class TransferGroup:
    """One update's process group; rank 0 (the trainer's first rank) is every broadcast's root."""

    def __init__(
        self,
        store: Any,
        label: str,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        device: torch.device | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"transfer rank {rank} is not in [0, {world_size})")
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        timeout = timedelta(seconds=timeout_s)
        prefix = dist.PrefixStore(f"{KEY_ROOT}/{label}/", store)
        if backend == "nccl":
            self.device = device or torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefix, rank, world_size, options)
        else:
            self.device = torch.device("cpu")
            self.group = dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
        self._options = dist.BroadcastOptions()
        self._options.rootRank = 0

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Broadcast ``tensor`` (on ``device``) from rank 0, in place; waits for it."""
        self.group.broadcast([tensor], self._options).wait()

    def start_broadcast(self, tensor: torch.Tensor) -> Any:
        """The same, without waiting: its ``Work`` (``.wait()`` it). Every rank starts the
        same broadcasts in the same order; two may be in flight at once."""
        return self.group.broadcast([tensor], self._options)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0 passes ``data``, the others None; every rank returns it."""
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        if data is not None:
            length.fill_(len(data))
        self.broadcast(length)
        n = int(length.item())
        if n == 0:
            return b""
        if data is not None:
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            payload = torch.empty(n, dtype=torch.uint8, device=self.device)
        self.broadcast(payload)
        return data if data is not None else payload.cpu().numpy().tobytes()

    def close(self) -> None:
        """Leave the group (its connections close; a peer still in a collective fails).

        Gloo's teardown takes ~30 ms of waiting (its threads and event loop stop), most of a
        small update's overhead, and its destructor releases the GIL: it runs on a thread of
        its own, so the transfer reports done at once. NCCL's shutdown stays inline (it frees
        the communicators' device memory before the next update allocates)."""
        group, self.group = self.group, None
        if group is None:
            return
        if self.backend == "nccl":
            shutdown = getattr(group, "shutdown", None)
            if shutdown is not None:
                shutdown()
            return
        holder = [group]
        del group  # the thread's reference is the last one: its clear() runs the teardown
        threading.Thread(target=holder.clear, name="transfer-group-close").start()
