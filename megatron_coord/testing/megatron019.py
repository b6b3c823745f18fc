"""Megatron-core 0.19.2 beside 0.16.1, for the interop tests and the benchmark.

0.19 needs Python 3.12 to install, and both versions are the package ``megatron``, so 0.19.2
cannot go into the venv. Its coordinator and client are pure Python and run on 3.11, so
``scripts/setup.sh`` runs ``python -m megatron_coord.testing.megatron019``: it downloads the
wheel (``pip download --no-deps --python-version 3.12``), unpacks it under
``.venv/megatron-core-0.19.2`` and replaces the one module that imports triton unconditionally
(MoE training kernels for GPUs, never used by the coordinator or client) with a stub. Processes
that should see 0.19 get ``environment()``: that directory first on PYTHONPATH. NVTX ranges
are off by default in 0.19 (no CUDA call on this path), so nothing else needs a stub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.19.2"
ROOT = Path(__file__).resolve().parents[2] / ".venv" / f"megatron-core-{VERSION}"
_TRITON_MODULE = Path("megatron/core/transformer/moe/ops/paged_stash.py")
_STUB = '''"""Stub written by megatron_coord's setup: the real module imports triton (GPU-only MoE
training kernels), which the coordinator and client never use."""

GLOBAL_BLOCK_SIZE = 1024
__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]


def paged_stash_copy_kernel(*args, **kwargs):
    raise RuntimeError("megatron_coord's install of megatron-core 0.19 has no triton kernels")


paged_stash_pop_kernel = paged_stash_copy_kernel
'''


def installed() -> bool:
    """Whether the unpacked, stubbed 0.19 is in place."""
    return (ROOT / _TRITON_MODULE).is_file() and "Stub written" in (
        ROOT / _TRITON_MODULE
    ).read_text()


def install() -> None:
    """Download, unpack and stub megatron-core 0.19.2 (idempotent)."""
    if installed():
        return
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--python-version",
                "3.12",
                "--only-binary=:all:",
                f"megatron-core=={VERSION}",
                "-d",
                download,
            ],
            check=True,
        )
        (wheel,) = Path(download).glob("megatron_core-*.whl")
        partial = ROOT.with_name(ROOT.name + ".partial")
        for stale in (partial, ROOT):  # an interrupted install's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(partial)
    (partial / _TRITON_MODULE).write_text(_STUB)
    os.replace(partial, ROOT)


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """A process environment in which ``import megatron`` is 0.19.2 (raises if not set up)."""
    if not installed():
        raise RuntimeError(f"megatron-core {VERSION} is not set up: run scripts/setup.sh")
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


if __name__ == "__main__":
    install()
