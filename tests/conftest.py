"""Shared fixtures: a real coordinator process with real fake-engine processes on loopback."""

from __future__ import annotations

import multiprocessing
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from megatron_coord.coordinator import DataParallelInferenceCoordinator
from megatron_coord.fake_engine import ByteTokenizer, spawn


@dataclass
class Deployment:
    """A coordinator process, its address and the engine processes serving it."""

    address: str
    process: multiprocessing.Process
    engines: list[subprocess.Popen] = field(default_factory=list)

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
    """Factory: deploy(n, megatron_style=False, **coordinator options) -> Deployment."""
    deployments: list[Deployment] = []

    def make(data_parallel_size: int = 2, megatron_style: bool = False, **kwargs: Any):
        address, process, ready = start_coordinator(data_parallel_size, **kwargs)
        deployment = Deployment(address, process)
        deployments.append(deployment)
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
