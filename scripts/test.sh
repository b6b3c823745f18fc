#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite plus the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
