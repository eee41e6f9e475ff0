"""Timing helpers for benchmarks: CUDA-event medians over warm, rotated inputs, and the measured copy bandwidth."""

from __future__ import annotations

import csv
import os
import statistics

import torch


def median_ms(fn, *, warmup: int = 5, repeat: int = 50) -> float:
    """Median time of `fn()` in ms, each call timed alone with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, *, repeat: int = 20) -> float:
    """Time of `fn()` in ms as replayed from a CUDA graph: GPU time without Python launch overhead.
    Warm-up runs on a side stream, as torch requires before capturing autograd work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # not capturable: report NaN rather than stop the whole benchmark
        print(f"# capture failed ({type(e).__name__}: {str(e)[:120]}); graph time NaN")
        torch.cuda.synchronize()
        return float("nan")
    return median_ms(graph.replay, warmup=3, repeat=repeat)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeat=20)
    return 2 * nbytes / ms / 1e6


def queued_ms(fn, *, calls: int = 50) -> float:
    """Mean time of `fn()` in ms over `calls` back-to-back calls between two events: GPU time whenever launching
    is faster than running (Triton's ~10-20 us launches). For code that cannot be captured in a CUDA graph
    (a failed capture leaves torch's CUDA RNG unusable, so such code is never captured)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def append_rows(path: str, rows: list[dict]) -> None:
    """Append long-format rows to a CSV; rows already there are kept and the header grows with new columns."""
    if not path or not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    fields = list(dict.fromkeys([k for r in old + rows for k in r]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old + rows)
