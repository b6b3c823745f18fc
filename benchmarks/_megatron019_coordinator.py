"""Megatron-core 0.19.2's own coordinator in a process of its own (0.19 on its path only:
``megatron019.environment()``), started as its launch does, with the byte tokenizer. Prints its
address on the first line of stdout and ``ready`` on the second once every engine registered
(it takes any frame before that as a registration), then serves until killed.

Run: ``python benchmarks/_megatron019_coordinator.py ENGINES``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron.core.inference.data_parallel_inference_coordinator import (  # noqa: E402
    DataParallelInferenceCoordinator,
)

from megatron_coord.testing.fake_engine import ByteTokenizer  # noqa: E402


class _StdoutPipe:
    """Stands in for the multiprocessing pipe on which 0.19 reports its address."""

    def send(self, address: str) -> None:
        print(address, flush=True)

    def close(self) -> None:
        pass


def main() -> None:
    engines = int(sys.argv[1])
    coordinator = DataParallelInferenceCoordinator(
        _StdoutPipe(), engines, ByteTokenizer(), max_requests=4096, hostname="127.0.0.1"
    )
    print("ready", flush=True)
    coordinator.start()


if __name__ == "__main__":
    main()
