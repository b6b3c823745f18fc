"""An engine's coordinator link that its owner never closed must not hang the process that
collects it (a ZMQ context finalized by the cyclic collector before its socket waits forever in
term(): it once hung an unrelated test for 180 s)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc
from megatron_coord.engine.coordinator_link import CoordinatorLink
from megatron_coord.engine.kv_blocks import BlockPool
from megatron_coord.parallel_state import single_process_state

gc.disable()
for i in range(10):
    # Nobody listens on port 9: the REGISTER stays unsent, as with a coordinator gone.
    link = CoordinatorLink(
        single_process_state(), BlockPool(4, 16), "tcp://127.0.0.1:9", b"e%d" % i, lambda: None
    )
    link.cycle = link  # only the cyclic collector can free it
    del link
    gc.collect()
print("collected")
"""


def test_a_link_never_closed_is_collected_without_hanging():
    # In a child process: without the fix this blocks forever, and a timeout must end it.
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "collected"
