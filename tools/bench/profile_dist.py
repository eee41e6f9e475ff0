"""Where the time of a data-parallel step goes: compute kernels, NCCL kernels, how much of NCCL's time overlaps
compute, and how much compute itself slows down next to NCCL (compare with the same script at one GPU).

    python tools/bench/profile_dist.py --shape qwen3-1.7b --mode full --accum 4                  # 1 GPU: baseline
    mpirun -n 2 python tools/bench/profile_dist.py --shape qwen3-1.7b --mode full --zero 3 --accum 4

Builds the step exactly as tools/bench/bench_dist.py does (the trainer's step classes, CUDA graphs on), warms it up,
then records --steps optimizer steps with torch.profiler. Each rank prints, per optimizer step:
- step: wall time between CUDA events around the profiled steps;
- compute / nccl: time covered by at least one compute (non-NCCL) / NCCL kernel (interval unions, so concurrent
  kernels count once);
- overlap: time covered by both; exposed nccl = nccl - overlap (communication nothing hides);
- idle: step - (compute + nccl - overlap), time with no kernel running;
and the kernel time per category (profile_step.py's categories plus "nccl"). Compute category times above the
1-GPU run's are the slowdown of kernels that share the GPU with NCCL's.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_dist import build  # noqa: E402
from profile_step import category, timed_ms  # noqa: E402


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length covered by the union of [start, end) intervals."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def kind(name: str) -> str:
    return "nccl" if "nccl" in name.lower() else category(name)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--mode", default="full")
    p.add_argument("--zero", type=int, default=0, help="ZeRO level under mpirun (ignored at one process)")
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()

    from surogate.cli.distributed import Processes, launched_by_mpi

    device = torch.device("cuda")
    world = None
    if launched_by_mpi():
        import surogate.dist as sd

        world = sd.init("cuda")
    procs = Processes(device, world, args.zero)
    step_fn, batches, _ = build(procs, args.shape, args.mode, args, True)

    def run(i: int) -> None:
        step_fn([batches[(i + j) % 2] for j in range(args.accum)], lr=1e-5, step=i + 1)

    for i in range(3):  # warm-up and capture
        run(i)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_ms = timed_ms(run, 10, args.steps)

    spans = collections.defaultdict(list)  # "nccl" / "compute" -> [(start_us, end_us)]
    per_kind = collections.defaultdict(float)
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        k = kind(evt.name)
        spans["nccl" if k == "nccl" else "compute"].append((evt.time_range.start, evt.time_range.end))
        per_kind[k] += evt.device_time / 1e3 / args.steps
    compute = union_us(spans["compute"]) / 1e3 / args.steps
    nccl = union_us(spans["nccl"]) / 1e3 / args.steps
    both = union_us(spans["compute"] + spans["nccl"]) / 1e3 / args.steps
    overlap = compute + nccl - both
    rank = procs.rank
    where = f"{procs.world_size} GPU(s), zero {procs.zero_level}" if world else "1 GPU"
    lines = [f"[rank {rank}] {torch.cuda.get_device_name()} {args.shape} {args.mode} {where}, accumulation "
             f"{args.accum}: step {step_ms:.1f} ms; compute {compute:.1f}, nccl {nccl:.1f} (overlapped {overlap:.1f}, "
             f"exposed {nccl - overlap:.1f}), idle {step_ms - both:.1f} ms"]
    for k, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"[rank {rank}]   {k:12} {ms:8.2f} ms/step")
    print("\n".join(lines), flush=True)
    step_fn.release_graphs()
    procs.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
