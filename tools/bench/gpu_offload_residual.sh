#!/usr/bin/env bash
# offload_residual and the QLoRA-NF4 memory target on the H100, in one call (about 4 minutes). Results under $OUT:
#   pytest_gpu.log   gpu tests of tests/models/test_models_offload.py: recompute_block + offload_residual equals
#                    recompute_block alone on CUDA, eager and replayed as a captured CUDA graph; the peak drops
#   bench.log        Qwen3-8B shape, LoRA r16 (7 modules), seq 2048 x micro-batch 2, CUDA graphs:
#                    {bf16, qlora-nf4} x {no recompute, recompute_block, recompute_block + offload_residual}, each
#                    with its memory breakdown (weights, + optimizer, training peak, host buffers); then Qwen3-0.6B
#                    LoRA with recompute_block (+ offload_residual) next to transformers + peft + Liger + checkpointing
#   sft.csv          the same rows in bench_sft's CSV format (append them to benchmarks/sft.csv)
# Device call: command "bash tools/bench/gpu_offload_residual.sh", carry [".whl"] (the Liger wheel for the peer row).
set -u
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/gpu-out}
B="python3 tools/bench/bench_sft.py --modes lora --memory-breakdown --out $OUT/sft.csv"
BENCH="$B --models qwen3-8b --recipes bf16,qlora-nf4 --frameworks surogate,surogate-ckpt,surogate-ckpt-offload \
--steps 4 --warmup 2; $B --models qwen3-0.6b --recipes bf16 \
--frameworks surogate-ckpt,surogate-ckpt-offload,hf-liger-ckpt --steps 8 --warmup 2" \
  exec bash tools/gpu_run.sh tests/models/test_models_offload.py -s
