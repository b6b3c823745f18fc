#!/usr/bin/env bash
# Create .venv with every dependency and build the package (editable) with its C++ extension.
# Idempotent: a second run with unchanged inputs only checks that the stamp is current.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat requirements.txt setup.py csrc/*.cpp scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import megatron_coord._C" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade "pip>=24" "setuptools>=64" wheel
  # torch first: setup.py builds the extension against it (--no-build-isolation).
  .venv/bin/pip install --quiet torch==2.13.0
  .venv/bin/pip install --quiet --no-build-isolation -e ".[test,bench]"
  .venv/bin/pip install --quiet -r requirements.txt
  # Megatron-core 0.16.1 for the interop tests and the side-by-side benchmark. --no-deps: its
  # coordinator and client need only torch, pyzmq and msgpack (already installed), and its
  # declared dependencies would pull in packages we do not use.
  .venv/bin/pip install --quiet --no-deps megatron-core==0.16.1 packaging
  echo "$want" > "$stamp"
fi
# Megatron-core 0.19.2 beside it (a Python 3.12 wheel, unpacked under .venv, never imported by
# the venv itself): the 0.19 interop tests and benchmark put it on their processes' path.
.venv/bin/python -m megatron_coord.testing.megatron019
