"""``pip install`` as a user does it (scripts/check_install.sh): a new venv with only torch, a
wheel of this checkout, and from outside the checkout on an empty cache: the imports, every
console script, and the quick start's job under torchrun (``-m`` and ``--no-python``)."""

from __future__ import annotations

import os
import subprocess

import pytest
from _procs import ROOT

pytestmark = [pytest.mark.install, pytest.mark.timeout(900)]


def test_pip_install_then_the_quick_start_job_outside_the_checkout():
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "check_install.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for line in ("imports: ok", "console scripts: ok", "generate from outside the checkout: ok"):
        assert line in proc.stdout
    assert "site-packages/megatron_coord/__init__.py" in proc.stdout  # not the checkout's copy
