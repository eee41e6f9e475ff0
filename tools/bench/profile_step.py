"""Where the GPU time of one training step goes: a kernel-level profile of our step on one GPU.

Builds the same step as bench_sft.py (random weights, one causal document per row), runs it captured as CUDA
graphs under torch.profiler, and prints the GPU time per kernel name and per category (GEMM, attention, our
Numba kernels, torch elementwise / copies), plus the idle time between kernels (the step's wall time minus the
kernels' busy time). Writes the table as CSV when --csv is given.

Usage: python tools/bench/profile_step.py --model qwen3-0.6b --mode lora [--eager] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sft import LORA_TARGETS, hf_config, make_batches  # noqa: E402

CATEGORIES = (  # first match wins; lower-case substrings of the kernel name
    ("attention", ("flash", "fmha")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "splitk")),
    ("numba", ("cudapy", "numba", "_kernel_")),
    ("copy/cast", ("copy", "memcpy", "memset", "cat", "fill")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def timed_ms(run, first: int, steps: int) -> float:
    """GPU milliseconds per call of run(first), ..., run(first + steps - 1), between CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        run(first + i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def build_step(name: str, mode: str, seq_len: int, micro_batch: int, cuda_graphs: bool, recompute):
    from surogate.cli.param_group import param_groups
    from surogate.cli.step import TrainStep
    from surogate.models import LoraConfig, init_model

    arch, config = hf_config(name)
    lora = LoraConfig(rank=16, alpha=32, target_modules=tuple(LORA_TARGETS)) if mode == "lora" else None
    model = init_model(config.to_dict() | {"architectures": [arch]}, dtype=torch.bfloat16, device="cuda", lora=lora,
                       recompute=recompute)
    groups = param_groups(model.trainable_parameters(), weight_decay=0.0 if mode == "lora" else 0.1)
    step = TrainStep(model, groups, micro_batch=micro_batch, seq_len=seq_len, cuda_graphs=cuda_graphs)
    position_ids = torch.arange(seq_len).expand(micro_batch, seq_len).contiguous()
    batches = [dict(input_ids=b[:, :-1].contiguous(), labels=b[:, 1:].contiguous(), position_ids=position_ids)
               for b in make_batches(config.vocab_size, micro_batch, seq_len, 2)]
    return lambda i: step([batches[i % 2]], lr=1e-5, step=i + 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--mode", default="lora")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--recompute", default=None)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--csv", default="")
    args = p.parse_args()

    run = build_step(args.model, args.mode, args.seq_len, args.micro_batch, not args.eager, args.recompute)
    for i in range(3):
        run(i)
    torch.cuda.synchronize()
    step_ms = timed_ms(run, 3, args.steps)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            run(100 + i)
        torch.cuda.synchronize()
    per_name = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            rec = per_name[evt.name]
            rec[0] += evt.device_time / 1e3 / args.steps  # us -> ms per step
            rec[1] += 1
    busy = sum(v[0] for v in per_name.values())
    per_cat = collections.defaultdict(float)
    for n, (ms, _) in per_name.items():
        per_cat[category(n)] += ms
    mode = "eager" if args.eager else "CUDA graphs"
    tokens = args.seq_len * args.micro_batch
    print(f"# {torch.cuda.get_device_name()} {args.model} {args.mode} {mode}: step {step_ms:.2f} ms "
          f"({tokens / step_ms * 1e3:.0f} tok/s), kernels busy {busy:.2f} ms, idle {step_ms - busy:.2f} ms")
    print(f"{'category':12} {'ms/step':>8} {'share':>6}")
    for cat, ms in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"{cat:12} {ms:8.2f} {100 * ms / step_ms:5.1f}%")
    print(f"\n{'ms/step':>8} {'calls':>6} {'category':12} kernel")
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    for n, (ms, calls) in rows[: args.top]:
        print(f"{ms:8.3f} {calls // args.steps:6d} {category(n):12} {n[:110]}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kernel", "category", "ms_per_step", "calls_per_step", "step_ms", "mode"])
            for n, (ms, calls) in rows:
                w.writerow([n, category(n), round(ms, 4), calls // args.steps, round(step_ms, 3), mode])


if __name__ == "__main__":
    main()
