#!/usr/bin/env bash
# On the GPU machine: the quickstart, then a 50-step Qwen3-0.6B-shaped LoRA run through the CLI (random weights).
# Logs and metrics land under $OUT. Usage: bash tools/gpu_cli_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | tr '\n' ':')${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
surogate() { python3 -c "import sys; from surogate.cli.app import main; sys.exit(main())" "$@"; }
echo "== quickstart on the GPU"
( time surogate sft examples/quickstart/sft.yaml output_dir=$OUT/quickstart ) 2>&1 | tail -15 | tee "$OUT/quickstart.log"
echo "== Qwen3-0.6B shape, LoRA r16, 50 steps"
python3 tools/make_random_model.py qwen3-0.6b /tmp/qwen3-0.6b
surogate sft examples/bench/qwen3-0.6b-lora.yaml model=/tmp/qwen3-0.6b output_dir=/tmp/q06-out 2>&1 | tail -25 | tee "$OUT/qwen3-0.6b-lora.log"
cp /tmp/q06-out/metrics.jsonl "$OUT/qwen3-0.6b-lora-metrics.jsonl" 2>/dev/null
