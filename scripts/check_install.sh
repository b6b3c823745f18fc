#!/usr/bin/env bash
# A user's `pip install`, checked end to end: a new venv with nothing but torch, this checkout
# installed into it (not editable), then, from a directory outside the checkout and on an empty
# model cache, the quick start's job and every command-line tool. tests/test_pip_install.py runs
# this; it is also fine to run by hand. Everything it makes is removed at the end.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
work=$(mktemp -d -t megatron-coord-install.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/venv"
bin="$work/venv/bin"
"$bin/pip" install --quiet --upgrade "pip>=24" "setuptools>=64" wheel
# --no-compile: byte-compiling torch's files takes longer than the install (imports compile lazily)
"$bin/pip" install --quiet --no-compile torch==2.13.0
# The wheel is built from a copy of the project's files (tracked, or new and not ignored), so
# nothing the checkout built (build/, the editable _C) can leak into it.
mkdir "$work/src"
git -C "$src" ls-files -z --cached --others --exclude-standard | (cd "$src" && xargs -0 cp --parents -t "$work/src")
"$bin/pip" wheel --quiet --no-build-isolation --no-deps --wheel-dir "$work/dist" "$work/src"
"$bin/pip" install --quiet --no-compile --no-build-isolation "$work"/dist/megatron_coord-*.whl

cd "$work"
export MEGATRON_COORD_CACHE="$work/cache"
"$bin/python" - <<'PY'
import megatron_coord._C  # without torch imported first
import megatron_coord
from megatron_coord import DataParallelInferenceCoordinator, InferenceClient, SamplingParams, Headers
import megatron_coord.engine, megatron_coord.serving, megatron_coord.launch.serve
assert "site-packages" in megatron_coord.__file__, megatron_coord.__file__
print("imports: ok,", megatron_coord.__file__)
PY
for tool in megatron-coord-coordinator megatron-coord-keys megatron-coord-http \
  megatron-coord-generate megatron-coord-serve; do
  "$bin/$tool" --help >/dev/null
done
echo "console scripts: ok"
"$bin/torchrun" --nproc-per-node 2 -m megatron_coord.launch.generate --prompt "Hello world" \
  --prompt "The quick brown fox" --num-tokens-to-generate 16 --output-json out.json
"$bin/torchrun" --nproc-per-node 2 --no-python "$bin/megatron-coord-generate" \
  --prompt "Hello world" --num-tokens-to-generate 4 --output-json out2.json --quiet
"$bin/python" - <<'PY'
import json
completions = json.load(open("out.json"))
assert [c["prompt"] for c in completions] == ["Hello world", "The quick brown fox"], completions
assert all(len(c["generated_tokens"]) == 16 for c in completions), completions
assert len(json.load(open("out2.json"))) == 1
print("generate from outside the checkout: ok")
PY
