"""The client's side of weight updates: ``InferenceClient.update_weights``.

    outcome = await client.update_weights("v8", checkpoint="/ckpt/step-800")
    outcome = await client.update_weights(
        "v9", sender=WeightSender(), named_tensors=model.named_parameters(), mode="recompute"
    )

One call updates every replica through the coordinator (coordinator/weight_updates.py), all
or nothing: it returns the coordinator's UPDATE_WEIGHTS_DONE dict when the version was
published, and raises ``WeightUpdateError`` (carrying that dict: which replicas failed, why)
when it was not. A spec the coordinator refuses (a bad field, another update in progress,
Megatron engines registered) raises ``RequestError`` with its code. With a ``sender``
(weights/sender.py) the tensors travel over torch.distributed: the call awaits
WEIGHT_TRANSFER_READY (every replica knows its ranks), runs ``sender.send`` in a thread (the
event loop, and so the requests in flight on this client, go on meanwhile), then awaits the
result. Kept apart from client.py, which takes this class as a base.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec

from .client_requests import RequestError
from .protocol import Headers

_encode = msgspec.msgpack.Encoder().encode
# The client waits this much longer than the update's own timeout: the coordinator answers by
# then (it fails the replicas that did not answer in time).
_ANSWER_MARGIN_S = 30.0


class WeightUpdateError(RuntimeError):
    """An update that was not published; ``result`` is the coordinator's UPDATE_WEIGHTS_DONE
    dict (``failed``: the replicas that failed, ``error``: why), ``sender_error`` what the
    trainer's side raised, if anything."""

    def __init__(self, result: dict[str, Any], sender_error: BaseException | None = None) -> None:
        message = result.get("error") or f"version {result.get('version')!r} was not published"
        if sender_error is not None:
            message += f" (the sender: {sender_error})"
        super().__init__(message)
        self.result = result
        self.sender_error = sender_error


class _Pending:
    """One update this client asked for: the futures of its two answers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ready: asyncio.Future = loop.create_future()  # WEIGHT_TRANSFER_READY
        self.done: asyncio.Future = loop.create_future()  # UPDATE_WEIGHTS_DONE (or ERROR)

    def fail(self, error: BaseException) -> None:
        for future in (self.ready, self.done):
            if not future.done():
                future.set_exception(error)
        if self.ready.done():
            self.ready.exception()  # retrieved: never "exception was never retrieved"


class WeightUpdatesClient:
    """``update_weights`` for ``InferenceClient`` (see the module docstring); it uses the
    client's ``socket`` and ``connected``."""

    _updates_pending: dict[str, _Pending]
    _next_update = 0

    async def update_weights(
        self,
        version: str,
        *,
        checkpoint: str | None = None,
        sender: Any = None,
        named_tensors: Any = None,
        in_place: bool = False,
        mode: str = "keep",
        abort_older_than: str | None = None,
        timeout_s: float = 300.0,
    ) -> dict[str, Any]:
        """Update every replica to ``version`` from exactly one source: a ``checkpoint``
        directory (HF safetensors, read by each rank where it runs), a ``sender`` (a
        ``WeightSender``) with the trainer's ``named_tensors`` (name, tensor) pairs, or
        ``in_place`` (the parameters were changed by their owner). ``mode``: what becomes of
        the requests in flight (abort, keep, recompute); ``abort_older_than``: also abort
        those whose first token came from a version published before it. Returns the
        coordinator's result (``published`` true); raises WeightUpdateError if not published,
        RequestError if refused, ValueError for bad arguments here."""
        sources = [checkpoint is not None, sender is not None, bool(in_place)]
        if sum(sources) != 1:
            raise ValueError("give exactly one source: checkpoint, sender or in_place=True")
        if sender is not None and named_tensors is None:
            raise ValueError("a sender needs the named_tensors to send")
        if checkpoint is not None:
            source: dict[str, Any] = {"kind": "checkpoint", "path": str(checkpoint)}
        elif sender is not None:
            source = sender.source_spec()
        else:
            source = {"kind": "in_place"}
        spec = {
            "version": version,
            "source": source,
            "mode": mode,
            "abort_older_than": abort_older_than,
            "timeout_s": timeout_s,
        }
        if not self.connected.is_set():
            raise ConnectionError("not connected to the coordinator")
        loop = asyncio.get_running_loop()
        if not hasattr(self, "_updates_pending"):
            self._updates_pending = {}
        WeightUpdatesClient._next_update += 1
        client_request_id = f"update-{WeightUpdatesClient._next_update}"
        pending = self._updates_pending[client_request_id] = _Pending(loop)
        wait_s = timeout_s + _ANSWER_MARGIN_S
        try:
            self.socket.send(_encode([int(Headers.UPDATE_WEIGHTS), client_request_id, spec]))
            sender_error = None
            if sender is not None:
                sender_error = await self._transfer(pending, sender, named_tensors, version, wait_s)
            try:
                result = await asyncio.wait_for(asyncio.shield(pending.done), wait_s)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"no answer to the update to {version!r} within {wait_s:g} s"
                ) from None
        finally:
            self._updates_pending.pop(client_request_id, None)
        if not result.get("published"):
            raise WeightUpdateError(result, sender_error)
        return result

    async def _transfer(
        self, pending: _Pending, sender: Any, named_tensors: Any, version: str, wait_s: float
    ) -> BaseException | None:
        """Await WEIGHT_TRANSFER_READY (or an early answer), then send the tensors in a
        thread; what the sender raised (the replicas fail then too: the result says why)."""
        waiting = {pending.ready, pending.done}
        finished, _ = await asyncio.wait(waiting, timeout=wait_s, return_when="FIRST_COMPLETED")
        if not finished:
            raise TimeoutError(f"no WEIGHT_TRANSFER_READY for {version!r} within {wait_s:g} s")
        ready = pending.ready
        if not ready.done() or ready.cancelled() or ready.exception() is not None:
            return None  # answered (or refused) before the transfer: the result says why
        world_size = ready.result()["world_size"]
        try:
            await asyncio.to_thread(sender.send, named_tensors, world_size, version=version)
        except Exception as exc:  # noqa: BLE001 - reported with the coordinator's result
            return exc
        return None

    def _on_update_message(self, message: list[Any]) -> None:
        """WEIGHT_TRANSFER_READY / UPDATE_WEIGHTS_DONE ``[header, client_request_id, dict]``."""
        pending = getattr(self, "_updates_pending", {}).get(message[1])
        if pending is None:
            return
        future = pending.ready if message[0] == Headers.WEIGHT_TRANSFER_READY else pending.done
        if not future.done():
            future.set_result(message[2])
        if future is pending.done and not pending.ready.done():
            pending.ready.cancel()

    def _update_refused(self, client_request_id: Any, error: RequestError) -> bool:
        """An ERROR for an update of ours: it fails that call (True); False if no update."""
        pending = getattr(self, "_updates_pending", {}).get(client_request_id)
        if pending is None:
            return False
        pending.fail(error)
        return True

    def _abandon_updates(self, error: BaseException) -> None:
        """The client stops: every update call still waiting fails."""
        for pending in getattr(self, "_updates_pending", {}).values():
            with contextlib.suppress(asyncio.InvalidStateError):
                pending.fail(error)
