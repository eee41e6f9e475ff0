"""Data-parallel training throughput: the trainer's step (surogate.cli.distributed) at 1 GPU and under mpirun.

Run it once per world size; each run loops over shapes x modes x ZeRO levels in one process (kernels compile once):

    python tools/bench/bench_dist.py --shapes qwen3-0.6b,qwen3-1.7b --modes lora,full --out results.jsonl
    mpirun -n 2 python tools/bench/bench_dist.py --zeros 1,3 --shapes ... --out results.jsonl

Every rank trains its own random rows ([micro_batch, seq_len], one causal document per row) with random weights
(the same on every rank); a step's tokens are world_size * micro_batch * seq_len. Rank 0 appends one JSON line per
configuration: world_size, shape, mode, zero, cuda_graphs, tok_per_s (global, median step time over the timed
steps after the warm-up), step_ms, peak_gib. `--accum N` runs N micro-batches per optimizer step (the reference
Surogate's published runs use 4): the gradient reduction is then paid once per N micro-steps.
At world size 1 `--zeros` is ignored (plain TrainStep) and
`--eager-too` adds a run without CUDA graphs (ZeRO-3 runs eagerly: its fair 1-GPU baseline).
`--device cpu --shapes tiny` runs the same code on the CPU with gloo (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import LORA_TARGETS, SHAPES  # noqa: E402

TINY = dict(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300, tie_word_embeddings=True)


def _config(shape: str) -> dict:
    c = dict(TINY if shape == "tiny" else SHAPES[shape])
    c.setdefault("rope_theta", 1000000.0)
    c.setdefault("rms_norm_eps", 1e-6)
    c.setdefault("max_position_embeddings", 40960)
    return c


def build(procs, shape: str, mode: str, args, cuda_graphs: bool):
    """-> (step_fn, batches, config): the trainer's step for this world and ZeRO level, two windows of random rows."""
    from surogate.cli.param_group import param_groups
    from surogate.models import LoraConfig, init_model

    device = procs.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lora = LoraConfig(rank=16, alpha=32, target_modules=tuple(LORA_TARGETS)) if mode == "lora" else None
    config = _config(shape)
    torch.manual_seed(0)
    model = init_model(config, dtype=dtype, device=device, lora=lora, seed=0)
    model.train()
    groups = param_groups(model.trainable_parameters(), weight_decay=0.0 if mode == "lora" else 0.1)
    groups = procs.shard_groups(groups, model)
    step_fn = procs.train_step(model, groups, micro_batch=args.micro_batch, seq_len=args.seq_len,
                               cuda_graphs=cuda_graphs)
    g = torch.Generator().manual_seed(1 + procs.rank)
    position_ids = torch.arange(args.seq_len).expand(args.micro_batch, args.seq_len).contiguous()
    batches = []
    for _ in range(2):
        ids = torch.randint(0, config["vocab_size"], (args.micro_batch, args.seq_len + 1), generator=g)
        batches.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                        "position_ids": position_ids})
    return step_fn, batches, config


def run(procs, shape: str, mode: str, args, cuda_graphs: bool) -> dict:
    device = procs.device
    step_fn, batches, _ = build(procs, shape, mode, args, cuda_graphs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        window = [batches[(i + j) % 2] for j in range(args.accum)]  # accum micro-batches per optimizer step
        loss_sum, valid, _ = step_fn(window, lr=1e-5, step=i + 1)
        loss = float(loss_sum) / max(valid, 1)  # a host sync per step, as the trainer's step line
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    if procs.world_size > 1:
        peak = procs.world.max(peak)
    tokens = procs.world_size * args.micro_batch * args.seq_len * args.accum
    step_fn.release_graphs()  # they captured NCCL collectives: freed while the process group lives
    return {"world_size": procs.world_size, "shape": shape, "mode": mode, "zero": procs.zero_level,
            "offload_grads": procs.offload_grads, "accum": args.accum,
            "cuda_graphs": bool(step_fn.cuda_graphs), "tok_per_s": tokens / step_s, "step_ms": 1e3 * step_s,
            "peak_gib": peak, "loss": loss, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen3-0.6b,qwen3-1.7b")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--zeros", default="1,3")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eager-too", action="store_true", help="at world size 1: also without CUDA graphs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--deadline", type=float, default=0.0, help="unix time after which no new config starts")
    parser.add_argument("--offload-grads", action="store_true",
                        help="zero 2 rows with the fp32 gradient shard in pinned host memory (offload_grads)")
    parser.add_argument("--out", default="benchmarks/dist.jsonl")
    args = parser.parse_args()

    from surogate.cli.distributed import Processes, launched_by_mpi

    device = torch.device(args.device)
    world = None
    if launched_by_mpi():
        import surogate.dist as sd

        world = sd.init(device.type)
    zeros = [int(z) for z in args.zeros.split(",")] if world is not None and world.world_size > 1 else [0]
    plans = [(s, m, z, True) for s in args.shapes.split(",") for m in args.modes.split(",") for z in zeros]
    if (world is None or world.world_size == 1) and args.eager_too and device.type == "cuda":
        plans += [(s, m, 0, False) for s, m, _, _ in list(plans)]
    out = Path(args.out)
    for shape, mode, zero, graphs in plans:
        late = args.deadline > 0 and time.time() > args.deadline
        if world is not None and world.world_size > 1:
            late = world.broadcast_object(late)  # every rank stops at the same config
        if late:
            print(f"deadline passed: skipping {shape} {mode} zero {zero} and the rest", flush=True)
            break
        procs = Processes(device, world, zero, offload_grads=args.offload_grads and zero == 2)
        row = run(procs, shape, mode, args, graphs)
        if procs.is_main:
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        del procs, row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if world is not None:
        import surogate.dist as sd

        sd.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
