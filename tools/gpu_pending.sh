#!/usr/bin/env bash
# The GPU work of the 2026-11-28 session, one device call per part; results under $OUT.
# Part 1, one GPU (about 6 minutes on an H100): "bash tools/gpu_pending.sh", carry [".whl"].
#   - the gpu tests touched by the fp8 calibration step, the (bucket, reduces) graph keys and nvfp4's 1-D weights.
#   - issue 7's bench table: each QLoRA mode (fp8, nvfp4, nf4) at the 0.6B / 4B / 8B shapes, 0.6B bf16 vs fp8-hybrid.
#   - issue 9: Qwen3-8B full fine-tune with fp32 states offloaded at 16 micro-batches per step, the 4B baseline.
# Part 2, two GPUs (kind nvidia-h100-x2, about 7 minutes): "PART=2 bash tools/gpu_pending.sh"
#   - issue 8: data-parallel scaling with gradient accumulation 4: one GPU, then zero 0 and 1, then zero 3 (now
#     captured in CUDA graphs; a separate launch so that a failure there keeps the other rows), both shapes, full
#     and LoRA; the 2-GPU gpu tests (tests/dist/test_dist_gpu.py).
# Part 3, two GPUs (about 6 minutes): "PART=3 bash tools/gpu_pending.sh"
#   - issue 8: the 2-rank equivalence in fp32 on the GPUs (zero 0-3, zero 3 now with graphs), held to 1e-5 like the
#     CPU, then the zero-3 rows without accumulation as time allows.
# Part 4, two GPUs (about 8 minutes): "PART=4 bash tools/gpu_pending.sh": see below. Part 5 (about 3 minutes) too.
# Part 6, one GPU (not run yet): "PART=6 bash tools/gpu_pending.sh", carry [".whl"]: see below.
# Part 7, two GPUs: "PART=7 bash tools/gpu_pending.sh" (kind nvidia-h100-x2): see below.
# Part 8, two GPUs (about 7 minutes): "PART=8 bash tools/gpu_pending.sh" (kind nvidia-h100-x2), carry [".whl"].
# Part 9, one H100 (about 4 minutes): "PART=9 bash tools/gpu_pending.sh" (kind nvidia-h100-x1).
# Part 10, two GPUs (about 4 minutes): "PART=10 bash tools/gpu_pending.sh" (kind nvidia-h100-x2).
# Part 11, one GPU (about 4 minutes): "PART=11 bash tools/gpu_pending.sh" (kind nvidia-h100-x1), carry [".whl"].
# Part 12, two GPUs (about 5 minutes): "PART=12 bash tools/gpu_pending.sh" (right after part 10: warm).
# Part 13, two GPUs (about 6 minutes): "PART=13 bash tools/gpu_pending.sh" (kind nvidia-h100-x2).
# Part 14, two GPUs (about 4 minutes): "PART=14 bash tools/gpu_pending.sh" (kind nvidia-h100-x2).
# Part 15, one GPU (about 5 minutes): "PART=15 bash tools/gpu_pending.sh" (kind nvidia-h100-x1).
# Part 16, two GPUs (about 3 minutes): "PART=16 bash tools/gpu_pending.sh" (kind nvidia-h100-x2).
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$(ls -d "$PWD"/packages/*/src | tr '\n' ':')${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
MPI=(mpirun -n 2 --allow-run-as-root --oversubscribe --bind-to none -x PYTHONPATH -x PYTHONUNBUFFERED)
case "${PART:-1}" in
1)
  timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/cli/test_step.py tests/quant/test_recipe.py \
    tests/models/test_models_recipes.py > "$OUT/pytest_gpu.log" 2>&1
  tail -3 "$OUT/pytest_gpu.log"
  timeout 240 python3 tools/bench/bench_sft.py --steps 4 --warmup 2 --models qwen3-0.6b,qwen3-4b,qwen3-8b \
    --modes lora --recipes qlora-fp8,qlora-nvfp4,qlora-nf4 --frameworks surogate --out "$OUT/sft.csv" | tail -12
  timeout 60 python3 tools/bench/bench_sft.py --steps 4 --warmup 2 --models qwen3-0.6b --modes lora \
    --recipes bf16,fp8-hybrid --frameworks surogate --out "$OUT/sft.csv" | tail -3
  timeout 200 python3 tools/bench/bench_offload.py --budget-s 180 \
    --rows qwen3-4b:full:none,qwen3-8b:full:offload_both:stream:16 --out "$OUT/offload.csv" \
    --json "$OUT/offload.json" 2>&1 | tee "$OUT/bench_offload.log" | tail -8
  ;;
2)
  DEADLINE=$(( $(date +%s) + 330 ))
  BENCH=(tools/bench/bench_dist.py --shapes qwen3-0.6b,qwen3-1.7b --modes full,lora --accum 4 --steps 6 --warmup 2
         --deadline "$DEADLINE" --out "$OUT/dist.jsonl")
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 "${BENCH[@]}" | tail -4
  timeout 150 "${MPI[@]}" python3 "${BENCH[@]}" --zeros 0,1 | tail -8
  timeout 120 "${MPI[@]}" python3 "${BENCH[@]}" --zeros 3 2>&1 | tail -12
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/dist/test_dist_gpu.py 2>&1 | tail -3
  ;;
3)
  EQ_DTYPE=float32 EQ_ZEROS="0 1 2 3" EQ_TIMEOUT=75 BENCH_ZEROS=3 BENCH_MODES=lora,full EAGER_TOO=0 \
    bash tools/gpu_dist_check.sh 2>&1 | tail -30
  ;;
4)
  # zero 3 with bf16 reduce-scatters and the backward prefetch from a live part: scaling at accumulation 4 against
  # the 1-GPU rows of this machine; the equivalence of zero 3 in bf16 (its numerics changed), then fp32 full
  # fine-tuning against the same-shape reference (micro-batch 1 x 4); nvfp4's 1-D weights on the GPU.
  DEADLINE=$(( $(date +%s) + 200 ))
  BENCH=(tools/bench/bench_dist.py --shapes qwen3-0.6b,qwen3-1.7b --accum 4 --steps 6 --warmup 2
         --deadline "$DEADLINE" --out "$OUT/dist.jsonl")
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 "${BENCH[@]}" --modes full | tail -2
  timeout 150 "${MPI[@]}" python3 "${BENCH[@]}" --modes full,lora --zeros 3 2>&1 | grep "^{" | tail -4
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/quant/test_recipe.py \
    -k nvfp4 2>&1 | tail -2
  OUT=$OUT/bf16 EQ_ZEROS=3 EQ_TIMEOUT=75 SKIP_BENCH=1 bash tools/gpu_dist_check.sh 2>&1 | grep "zero\|noise\|equivalence:"
  OUT=$OUT/fp32 EQ_DTYPE=float32 EQ_MODES=full EQ_REF=b1x4 EQ_TIMEOUT=75 SKIP_BENCH=1 bash tools/gpu_dist_check.sh \
    2>&1 | grep "zero\|noise\|equivalence:"
  ;;
5)
  # zero 3, full fine-tuning: the tied embedding gathered once per forward (kept for the head); then the same with
  # NCCL limited to 8 channels (fewer SMs taken from the GEMMs the collectives overlap). 1-GPU rows first.
  BENCH=(tools/bench/bench_dist.py --shapes qwen3-0.6b,qwen3-1.7b --modes full --accum 4 --steps 6 --warmup 2)
  CUDA_VISIBLE_DEVICES=0 timeout 80 python3 "${BENCH[@]}" --out "$OUT/dist.jsonl" | tail -2
  timeout 90 "${MPI[@]}" python3 "${BENCH[@]}" --zeros 3 --out "$OUT/dist.jsonl" 2>&1 | grep "^{"
  echo "== NCCL_MAX_NCHANNELS=8"
  NCCL_MAX_NCHANNELS=8 timeout 90 "${MPI[@]}" -x NCCL_MAX_NCHANNELS python3 "${BENCH[@]}" --zeros 3 \
    --out "$OUT/dist_nccl8.jsonl" 2>&1 | grep "^{"
  ;;
6)
  # for the next session (one GPU, about 7 minutes), issue 9's second target:
  # - recompute_block's rerun no longer runs the MLP's down GEMM;
  # - offload_weights (new): LoRA's frozen base weights stream from pinned host memory a layer ahead of use.
  # Qwen3-8B LoRA, bf16 (recompute_block, + offload_residual, + offload_weights) against QLoRA-NF4 with the same
  # flags, at micro-batch 2 and 4 (streaming moves ~28 GB per micro-step: 4 x 2048 tokens of compute hide it).
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/models/test_models_offload.py \
    tests/models/test_models_offload_weights.py tests/models/test_models_gpu.py 2>&1 | tail -2
  B=(tools/bench/bench_sft.py --modes lora --memory-breakdown --models qwen3-8b --steps 4 --warmup 2
     --out "$OUT/sft.csv")
  timeout 170 python3 "${B[@]}" --recipes bf16 \
    --frameworks surogate-ckpt,surogate-ckpt-offload,surogate-ckpt-offload-weights | tail -4
  timeout 90 python3 "${B[@]}" --recipes qlora-nf4 --frameworks surogate-ckpt,surogate-ckpt-offload | tail -2
  timeout 130 python3 "${B[@]}" --micro-batch 4 --recipes bf16 --frameworks surogate-ckpt-offload-weights | tail -1
  timeout 90 python3 "${B[@]}" --micro-batch 4 --recipes qlora-nf4 --frameworks surogate-ckpt-offload | tail -1
  ;;
7)
  # for the next session (two GPUs, about 3 minutes): where ZeRO-3's extra 20% goes in full fine-tuning. The same
  # step profiled at one GPU, zero 1 and zero 3 (compute vs NCCL time, overlap, per-category slowdown).
  P=(tools/bench/profile_dist.py --shape qwen3-1.7b --mode full --accum 4 --steps 2)
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 "${P[@]}" 2>&1 | grep "^\[rank"
  for z in 1 3; do timeout 120 "${MPI[@]}" python3 "${P[@]}" --zero $z 2>&1 | grep "^\[rank 0"; done
  # zero 3 in graphs with evaluation and a checkpoint between replays, as users run it (the quickstart, 60 steps)
  timeout 150 "${MPI[@]}" python3 -m surogate.cli.app sft examples/quickstart/sft.yaml zero_level=3 max_steps=60 \
    eval_steps=30 save_steps=30 eval_exact_match_samples=20 logging_steps=20 output_dir="$OUT/zero3-cli" 2>&1 \
    | grep "^step\|^eval\|^done\|rror" | tail -8
  ;;
8)
  # session 6: (1 GPU) offload_weights without the saved-tensor cycle that leaked cuDNN attention's activations:
  # gpu tests, Qwen3-8B LoRA bf16 recompute_block + offload_residual + offload_weights against QLoRA-NF4 with the
  # same flags at micro-batch 4 and 2; (2 GPUs) zero 3 full with copy-first gradient scratch and out-of-place
  # all-gathers, against this machine's 1-GPU rows; the 2-GPU gpu tests.
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/models/test_models_offload_weights.py tests/models/test_models_offload.py 2>&1 | tail -1
  B=(tools/bench/bench_sft.py --modes lora --memory-breakdown --models qwen3-8b --steps 4 --warmup 2
     --out "$OUT/sft.csv")
  export CUDA_VISIBLE_DEVICES=0
  timeout 100 python3 "${B[@]}" --micro-batch 4 --recipes bf16 --frameworks surogate-ckpt-offload-weights | tail -2
  timeout 80 python3 "${B[@]}" --micro-batch 4 --recipes qlora-nf4 --frameworks surogate-ckpt-offload | tail -2
  timeout 80 python3 "${B[@]}" --recipes bf16 --frameworks surogate-ckpt-offload-weights | tail -2
  unset CUDA_VISIBLE_DEVICES
  BENCH=(tools/bench/bench_dist.py --shapes qwen3-0.6b,qwen3-1.7b --modes full --accum 4 --steps 6 --warmup 2
         --out "$OUT/dist.jsonl")
  CUDA_VISIBLE_DEVICES=0 timeout 80 python3 "${BENCH[@]}" | tail -2
  timeout 100 "${MPI[@]}" python3 "${BENCH[@]}" --zeros 3 2>&1 | grep "^{"
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/dist/test_dist_gpu.py 2>&1 | tail -2
  ;;
9)
  # offload_weights with its 2-slot ring: the gpu tests, then Qwen3-8B LoRA bf16 against QLoRA-NF4 with the same
  # flags (recompute_block + offload_residual) at micro-batch 4, on an H100 like the quant issue's figures.
  timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/models/test_models_offload_weights.py \
    tests/models/test_models_offload.py 2>&1 | tail -1
  B=(tools/bench/bench_sft.py --modes lora --memory-breakdown --models qwen3-8b --steps 4 --warmup 2 --micro-batch 4
     --out "$OUT/sft.csv")
  timeout 100 python3 "${B[@]}" --recipes bf16 --frameworks surogate-ckpt-offload-weights | tail -2
  timeout 80 python3 "${B[@]}" --recipes qlora-nf4 --frameworks surogate-ckpt-offload | tail -2
  ;;
10)
  # for the next session: zero 3 full fine-tuning. First the 2-GPU gpu tests and the new default, the sparse input
  # embedding lookup (the table gathered only for a tied head, no reduce-scatter of it at the end of backward), with
  # a profile at 1.7B. Then NCCL's share of the SMs: the GEMMs ran 33 ms per step slower next to NCCL's kernels (1.7B,
  # RESULTS session 5): NCCL's "efficiency" CTA policy, at most 16 or 8 CTAs. The 1-GPU rows of this machine come
  # first; NCCL_DEBUG=VERSION prints NCCL's version.
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/dist/test_dist_gpu.py 2>&1 | tail -2
  D=(tools/bench/bench_dist.py --shapes qwen3-0.6b,qwen3-1.7b --modes full --accum 4 --steps 6 --warmup 2
     --out "$OUT/dist.jsonl")
  CUDA_VISIBLE_DEVICES=0 timeout 80 python3 "${D[@]}" | grep "^{"
  NCCL_DEBUG=VERSION timeout 100 "${MPI[@]}" -x NCCL_DEBUG python3 "${D[@]}" --zeros 3 2>&1 | grep "^{\|NCCL version"
  timeout 100 "${MPI[@]}" python3 tools/bench/profile_dist.py --shape qwen3-1.7b --mode full --accum 4 --steps 2 \
    --zero 3 2>&1 | grep "^\[rank 0"
  for setting in NCCL_CTA_POLICY=1 NCCL_MAX_CTAS=16 NCCL_MAX_CTAS=8; do
    echo "== $setting"
    env "$setting" timeout 100 "${MPI[@]}" -x "${setting%%=*}" python3 "${D[@]}" --zeros 3 2>&1 | grep "^{"
  done
  ;;
11)
  # issue 9's per-flag matrix where rows are missing: Qwen3-4B full fine-tune with each offload flag alone and both
  # (stream), 4B and 8B LoRA with the optimizer flags, 4B LoRA with the activation / weight flags.
  timeout 330 python3 tools/bench/bench_offload.py --budget-s 300 --out "$OUT/offload.csv" --json "$OUT/offload.json" \
    --rows qwen3-4b:full:none,qwen3-4b:full:offload_optimizer:stream,qwen3-4b:full:offload_master:stream,qwen3-4b:full:offload_both:stream,qwen3-4b:lora:none,qwen3-4b:lora:offload_both:stream,qwen3-8b:lora:offload_optimizer:stream \
    2>&1 | tail -9
  timeout 150 python3 tools/bench/bench_sft.py --modes lora --memory-breakdown --models qwen3-4b --steps 4 --warmup 2 \
    --recipes bf16 --frameworks surogate,surogate-ckpt,surogate-ckpt-offload,surogate-ckpt-offload-weights \
    --out "$OUT/sft.csv" | tail -8
  ;;
12)
  # issue 9: offload_grads (zero 2, fp32 gradient shard in pinned host memory) on two GPUs: the CLI's equality test
  # (bit for bit the run without it) on NCCL, and its cost at 1.7B full fine-tuning, accumulation 4.
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/cli/test_cli_mpirun.py -k offload_grads 2>&1 | tail -2
  D=(tools/bench/bench_dist.py --shapes qwen3-1.7b --modes full --zeros 2 --accum 4 --steps 6 --warmup 2
     --out "$OUT/dist.jsonl")
  timeout 80 "${MPI[@]}" python3 "${D[@]}" 2>&1 | grep "^{"
  timeout 80 "${MPI[@]}" python3 "${D[@]}" --offload-grads 2>&1 | grep "^{"
  # issue 8: zero 3 full at micro-batch 4 x accumulation 2 (the same tokens per step as 2 x 4; ZeRO-3 frees the memory
  # for it), against the 1-GPU rows at the same micro-batch: half the gathers per token.
  D4=(tools/bench/bench_dist.py --shapes qwen3-0.6b,qwen3-1.7b --modes full --micro-batch 4 --accum 2 --steps 6
      --warmup 2 --out "$OUT/dist.jsonl")
  CUDA_VISIBLE_DEVICES=0 timeout 80 python3 "${D4[@]}" | grep "^{"
  timeout 100 "${MPI[@]}" python3 "${D4[@]}" --zeros 3 2>&1 | grep "^{"
  ;;
13)
  # issue 9: part 12's offload_grads row printed nothing under its 80 s limit (the host-side adds of a 0.85 G-float
  # shard per micro-step); again with room and its error output. issue 8: part 12's micro-batch 4 x accumulation 2
  # rows (1.83x / 1.80x) repeated, to see their spread.
  D=(tools/bench/bench_dist.py --shapes qwen3-1.7b --modes full --zeros 2 --accum 4 --steps 4 --warmup 1
     --out "$OUT/dist.jsonl")
  timeout 200 "${MPI[@]}" python3 "${D[@]}" --offload-grads > "$OUT/offload_grads.log" 2>&1
  echo "rc $?"; grep "^{" "$OUT/offload_grads.log" || tail -20 "$OUT/offload_grads.log"
  D4=(tools/bench/bench_dist.py --shapes qwen3-0.6b,qwen3-1.7b --modes full --micro-batch 4 --accum 2 --steps 8
      --warmup 2 --out "$OUT/dist.jsonl")
  CUDA_VISIBLE_DEVICES=0 timeout 80 python3 "${D4[@]}" | grep "^{"
  timeout 100 "${MPI[@]}" python3 "${D4[@]}" --zeros 3 2>&1 | grep "^{"
  ;;
14)
  # issue 9: offload_grads summed on the device (host_grad_shard.py) instead of on the CPU (part 13: 9.3 s per step
  # against 0.42 s): the 2-GPU tests (bit for bit the device shard, NCCL), the CLI's equality test, the rows again.
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/dist/test_dist_gpu.py 2>&1 | tail -2
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/cli/test_cli_mpirun.py -k offload_grads 2>&1 | tail -2
  D=(tools/bench/bench_dist.py --shapes qwen3-1.7b --modes full --zeros 2 --accum 4 --steps 6 --warmup 2
     --out "$OUT/dist.jsonl")
  timeout 100 "${MPI[@]}" python3 "${D[@]}" 2>&1 | grep "^{"
  timeout 150 "${MPI[@]}" python3 "${D[@]}" --offload-grads > "$OUT/offload_grads.log" 2>&1
  echo "rc $?"; grep "^{" "$OUT/offload_grads.log" || tail -20 "$OUT/offload_grads.log"
  ;;
15)
  # issue 9: the memory line after the first step (resident + activations/workspace, host memory held) on a GPU,
  # through the CLI with every single-GPU offload flag; its gpu test; the last 8B per-flag row (full fine-tuning with
  # offload_optimizer alone: bf16 weights + grads + fp32 master stay, 66 GB; it may not fit 80 GB).
  timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/cli/test_report.py \
    tests/models/test_models_offload.py tests/models/test_models_offload_weights.py 2>&1 | tail -2
  timeout 120 python3 -m surogate.cli.app sft examples/quickstart/sft.yaml max_steps=20 output_dir="$OUT/qs" \
    recompute_block=true offload_residual=true offload_optimizer=true offload_master=true 2>&1 \
    | grep -i "memory\|peak\|step     20\|done"
  timeout 170 python3 tools/bench/bench_offload.py --budget-s 150 --out "$OUT/offload.csv" --json "$OUT/offload.json" \
    --rows qwen3-8b:full:offload_optimizer:stream 2>&1 | tail -3
  ;;
16)
  # issue 9: offload_grads with its copies back on a side stream, two staging buffers (host_grad_shard.py): the
  # bitwise gpu tests, then the 1.7B zero-2 rows with and without it (part 14: 918 ms against 421 per step).
  timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/dist/test_dist_gpu.py -k "offload or equal" \
    2>&1 | tail -2
  D=(tools/bench/bench_dist.py --shapes qwen3-1.7b --modes full --zeros 2 --accum 4 --steps 4 --warmup 1
     --out "$OUT/dist.jsonl")
  timeout 60 "${MPI[@]}" python3 "${D[@]}" 2>&1 | grep "^{"
  timeout 70 "${MPI[@]}" python3 "${D[@]}" --offload-grads 2>&1 | grep "^{\|Error"
  ;;
esac
