#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the linter and the whole test suite.
#
# The suite starts from nothing, as on a fresh machine: an empty private model cache and an empty
# home (so nothing under the user's ~/.cache or ~/.config is seen), removed afterwards. Python's
# faulthandler is on, so a crash of the test process names the place it happened.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .

scratch=$(mktemp -d -t megatron-coord-test.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/home"
export HOME="$scratch/home" XDG_CACHE_HOME="$scratch/home/.cache" XDG_CONFIG_HOME="$scratch/home/.config"
export MEGATRON_COORD_CACHE="$scratch/megatron_coord-cache" PYTHONFAULTHANDLER=1
# Two workers, a file to each at a time: most tests wait on child processes, not the CPU.
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
