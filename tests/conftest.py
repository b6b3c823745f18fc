"""Shared fixtures: a real coordinator process with real fake-engine processes on loopback."""

from __future__ import annotations

import multiprocessing
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from megatron_coord.coordinator import DataParallelInferenceCoordinator
from megatron_coord.testing.fake_engine import ByteTokenizer, spawn


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the pip-install check, then the files of real launches, then the rest.

    scripts/test.sh runs the suite on two pytest-xdist workers, a file to a worker
    (``--dist loadfile``, so a module's fixtures are built once); starting the long files first
    keeps one of them from running alone at the end. Stable within each group."""

    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("install"):
            return 0
        return 1 if item.get_closest_marker("torchrun") else 2

    items.sort(key=weight)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny seeded Llama checkpoint (test_engine.make_tiny_checkpoint), one per test module."""
    from test_engine import make_tiny_checkpoint

    path = str(tmp_path_factory.mktemp("tiny-llama"))
    make_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    """That checkpoint loaded at TP=1 (one per test module)."""
    from megatron_coord.models.checkpoint import load_model
    from megatron_coord.parallel_state import single_process_state

    return load_model(checkpoint, single_process_state())


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    """That checkpoint's tokenizer (GPT-2 BPE)."""
    from megatron_coord.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint)


@dataclass
class Deployment:
    """A coordinator process, its address and the engine processes serving it."""

    address: str
    process: multiprocessing.Process
    engines: list[subprocess.Popen] = field(default_factory=list)
    ready: Any = None  # set once every engine registered

    def wait_stopped(self, timeout: float = 30) -> None:
        """Wait for the coordinator and engines to exit on their own (after STOP)."""
        self.process.join(timeout)
        for engine in self.engines:
            engine.wait(timeout)


def start_coordinator(
    data_parallel_size: int, tokenizer: Any = None, **kwargs: Any
) -> tuple[str, multiprocessing.Process, Any]:
    """Spawn DataParallelInferenceCoordinator.entrypoint the way rank 0 of a launch does."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    ready = ctx.Event()
    process = ctx.Process(
        target=DataParallelInferenceCoordinator.entrypoint,
        args=(child, ready, data_parallel_size, tokenizer or ByteTokenizer()),
        kwargs=kwargs,
        daemon=True,
    )
    process.start()
    child.close()
    if not parent.poll(60):
        process.kill()
        raise RuntimeError("the coordinator did not report its address")
    return parent.recv(), process, ready


@pytest.fixture
def deploy() -> Iterator[Any]:
    """Factory: deploy(n, megatron_style=False, fake_engines=True, **options) -> Deployment.

    With ``fake_engines=False`` the test registers its own engines (``Peer``s)."""
    deployments: list[Deployment] = []

    def make(
        data_parallel_size: int = 2,
        megatron_style: bool = False,
        fake_engines: bool = True,
        **kwargs: Any,
    ) -> Deployment:
        address, process, ready = start_coordinator(data_parallel_size, **kwargs)
        deployment = Deployment(address, process, ready=ready)
        deployments.append(deployment)
        if fake_engines:
            for rank in range(data_parallel_size):
                deployment.engines.append(spawn(address, rank, megatron_style=megatron_style))
            assert ready.wait(60), "engines did not register"
        return deployment

    yield make
    for deployment in deployments:
        for engine in deployment.engines:
            if engine.poll() is None:
                engine.kill()
            engine.wait()
        if deployment.process.is_alive():
            deployment.process.kill()
        deployment.process.join()


class Peer:
    """A raw DEALER on loopback, for driving the coordinator frame by frame (client or engine)."""

    def __init__(self, address: str, identity: bytes | None = None, timeout_ms: int = 20000):
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(address)

    def send(self, *message: Any) -> None:
        from megatron_coord.protocol import encode

        self.sock.send(encode(list(message)))

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self) -> list[Any]:
        """The next message, decoded (raises zmq.Again after the timeout: the test fails)."""
        import msgspec

        return msgspec.msgpack.decode(self.sock.recv())

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms))

    def connect_ours(self) -> Peer:
        self.send(1, {"protocol": 1})
        assert self.recv() == [2]
        return self

    def close(self) -> None:
        self.sock.close(0)


class ThreadedCoordinator:
    """A coordinator serving in a thread of the test process, so tests can inspect its state."""

    def __init__(self, data_parallel_size: int, tokenizer: Any = None, **options: Any) -> None:
        import threading

        parent, child = multiprocessing.Pipe()
        self.coordinator: DataParallelInferenceCoordinator | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(child, data_parallel_size, tokenizer, options), daemon=True
        )
        self.thread.start()
        self.address = parent.recv()

    def _run(self, pipe: Any, size: int, tokenizer: Any, options: dict[str, Any]) -> None:
        try:
            self.coordinator = DataParallelInferenceCoordinator(
                pipe, size, tokenizer or ByteTokenizer(), **options
            )
            self.ready.set()
            self.coordinator.start()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def join(self, timeout: float = 30) -> DataParallelInferenceCoordinator:
        """Wait for the serve loop to end (after STOP); re-raise anything it raised."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the coordinator did not stop"
        if self.error is not None:
            raise self.error
        assert self.coordinator is not None
        self.coordinator.stop()
        return self.coordinator


# --- driving a coordinator by hand: raw engines, STATS, STOP ------------------------------------


def elastic_coordinator(**options: Any) -> tuple[ThreadedCoordinator, Peer]:
    """A ready coordinator with data_parallel_size=0 (engines join and leave at any time) and a
    client of ours connected to it."""
    coord = ThreadedCoordinator(0, **options)
    assert coord.ready.wait(30)
    return coord, Peer(coord.address).connect_ours()


def register(address: str, rank: int) -> Peer:
    """A raw engine of ours that has sent REGISTER as data-parallel rank ``rank``."""
    engine = Peer(address)
    engine.send(101, {"data_parallel_rank": rank, "protocol": 1})
    return engine


def query_stats(client: Peer) -> dict:
    """The coordinator's STATS dict (other messages arriving first are skipped)."""
    client.send(105)
    message = client.recv()
    while message[0] != 105:
        message = client.recv()
    return message[1]


def wait_stats(client: Peer, predicate, what: str, timeout: float = 30.0) -> dict:
    """Poll STATS until ``predicate`` holds; fail with ``what`` and the last STATS after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        current = query_stats(client)
        if predicate(current):
            return current
        assert time.monotonic() < deadline, f"{what}: {current}"
        time.sleep(0.02)


def stop(coord: ThreadedCoordinator, client: Peer) -> None:
    """STOP a coordinator whose engines ack by themselves; wait for STOP_ACK and the loop."""
    client.send(10)
    while client.recv() != [11]:
        pass
    coord.join()


def stop_with_raw_engines(
    coord: ThreadedCoordinator, client: Peer, engines: list[Peer]
) -> DataParallelInferenceCoordinator:
    """STOP, checking every raw engine is told and acking for it; the stopped coordinator."""
    client.send(10)
    for engine in engines:
        assert engine.recv() == [10]
        engine.send(11)
    assert client.recv() == [11]
    return coord.join()
