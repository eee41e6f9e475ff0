#!/usr/bin/env bash
# Issue 7 on the GPU in one call: fp8 / recipe GPU tests, the fp8-hybrid layer micro-benchmark, the quickstart
# training curves of every recipe / QLoRA mode / 8-bit AdamW, and (optional) the end-to-end Qwen3-4B LoRA step.
#   bash tools/bench/gpu_quant_check.sh [tests] [fp8] [curves] [sft]     (default: tests fp8 curves)
# Results under $OUT: pytest_quant_gpu.log, fp8_gemm.csv + bench_fp8_gemm.log, quant_curves.{csv,png} +
# quant_curves_summary.csv + quant_curves.log, sft.csv + bench_sft.log. Budget on an H100: tests ~2 min, fp8
# ~1 min, curves ~3 min, sft ~2 min.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | tr '\n' ':')${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
sections=${*:-tests fp8 curves}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0
for s in $sections; do
  case $s in
    tests)
      timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/quant/test_fp8.py tests/quant/test_recipe.py \
        tests/models/test_models_recipes.py \
        2>&1 | tee "$OUT/pytest_quant_gpu.log"
      r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && [ "$r" -ne 5 ] && rc=$r ;;
    fp8)
      timeout 240 python3 tools/bench/bench_fp8_gemm.py --models qwen3-4b,qwen3-8b --out "$OUT/fp8_gemm.csv" \
        2>&1 | tee "$OUT/bench_fp8_gemm.log" ;;
    curves)
      timeout 330 python3 tools/quant_curves.py --out-dir "$OUT" --work /tmp/quant_curves 2>&1 \
        | grep -v "^step " | tee "$OUT/quant_curves.log"
      r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r ;;
    sft)
      timeout 300 python3 tools/bench/bench_sft.py --steps 6 --warmup 2 --models qwen3-4b --modes lora \
        --recipes bf16,fp8-hybrid --frameworks surogate --out "$OUT/sft.csv" 2>&1 | tee "$OUT/bench_sft.log" ;;
    *) echo "unknown section $s (tests, fp8, curves, sft)"; rc=2 ;;
  esac
done
exit "$rc"
