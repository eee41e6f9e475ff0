#!/usr/bin/env bash
# Runs on the GPU machine (the H100, via the device tool): gpu-marked tests, then benchmarks, in one call.
# That machine has torch, numba-cuda, transformers and peft but no hatchling and no network, so our packages
# come from packages/*/src on PYTHONPATH. Results land under $OUT (or ./gpu-out).
#   bash tools/gpu_run.sh [pytest args...]        e.g. bash tools/gpu_run.sh tests/kernels
# Set BENCH="python tools/bench/bench_kernels.py ..." to choose benchmarks (empty: none).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | tr '\n' ':')${PYTHONPATH:-}
# Extra wheels carried in .whl/ (e.g. liger-kernel for the peer benchmarks): carry=[".whl"] in the device call.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, numba_cuda, numpy; print('torch', torch.__version__, 'numba-cuda', numba_cuda.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
rc=0
if [ "$#" -gt 0 ]; then
  python3 -m pytest -m gpu -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest_gpu.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 5 ] && rc=0
fi
if [ -n "${BENCH:-}" ]; then
  eval "$BENCH" 2>&1 | tee "$OUT/bench.log"
fi
exit "$rc"
