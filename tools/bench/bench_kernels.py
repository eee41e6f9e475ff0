"""Kernel benchmark on the GPU: every op forward and backward at Qwen3 shapes against torch eager (and
Liger-Kernel when installed). GPU time comes from CUDA-graph replay (launch overhead excluded, as in training,
where the step is a CUDA graph); eager times with launch overhead are printed too.

Usage: python tools/bench/bench_kernels.py [--ops rms_norm,...] [--out benchmarks/kernels.csv]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import copy_bandwidth_gbs, graph_ms, median_ms  # noqa: E402

ROWS = 4096  # tokens per micro-step: 2 x 2048
HIDDEN = {"qwen3-0.6b": 1024, "qwen3-1.7b": 2048, "qwen3-4b": 2560, "qwen3-8b": 4096}


def bench_rms_norm(dtype):
    from surogate.kernels.ops import rms_norm

    rows_out = []
    for model, hidden in HIDDEN.items():
        x = torch.randn(ROWS, hidden, device="cuda", dtype=dtype)
        w = torch.randn(hidden, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        y, rstd = rms_norm.forward(x, w, 1e-6)
        esize = x.element_size()
        fwd_bytes = 2 * x.numel() * esize + hidden * esize + ROWS * 4
        bwd_bytes = 3 * x.numel() * esize + ROWS * 4 + hidden * esize * 2
        cases = {
            "surogate": (lambda: rms_norm.forward(x, w, 1e-6), lambda: rms_norm.backward(dy, x, w, rstd)),
            "torch": (lambda: rms_norm.reference_forward(x, w, 1e-6), lambda: rms_norm.reference_backward(dy, x, w, rstd)),
        }
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            def liger_fwd():
                return LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False)

            xg = x.clone().requires_grad_()
            wg = w.clone().requires_grad_()
            yl = LigerRMSNormFunction.apply(xg, wg, 1e-6, 0.0, "llama", False)
            cases["liger"] = (liger_fwd, lambda: torch.autograd.grad(yl, (xg, wg), dy, retain_graph=True))
        except Exception:
            pass
        for provider, (fwd, bwd) in cases.items():
            for mode, fn, nbytes in (("forward", fwd, fwd_bytes), ("backward", bwd, bwd_bytes)):
                try:
                    gpu = graph_ms(fn)
                except Exception:  # not capturable (e.g. autograd.grad): fall back to eager timing
                    gpu = float("nan")
                eager = median_ms(fn)
                rows_out.append(dict(op="rms_norm", provider=provider, mode=mode, model=model, hidden=hidden,
                                     dtype=str(dtype).split(".")[-1], graph_us=gpu * 1e3, eager_us=eager * 1e3,
                                     gbs=nbytes / (gpu if gpu == gpu else eager) / 1e6))
    return rows_out


BENCHES = {"rms_norm": bench_rms_norm}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", default=",".join(BENCHES))
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--out", default="benchmarks/kernels.csv")
    args = parser.parse_args()
    copy = copy_bandwidth_gbs()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}; device copy bandwidth {copy:.0f} GB/s (read + write)")
    rows = []
    for op in args.ops.split(","):
        for dt in args.dtypes.split(","):
            rows += BENCHES[op](getattr(torch, dt))
    stamp = datetime.date.today().isoformat()
    print(f"{'op':10} {'provider':9} {'mode':8} {'model':11} {'dtype':8} {'graph us':>9} {'eager us':>9} {'GB/s':>7} {'%copy':>6}")
    for r in rows:
        r.update(date=stamp, gpu=gpu, pct_copy=100 * r["gbs"] / copy)
        print(f"{r['op']:10} {r['provider']:9} {r['mode']:8} {r['model']:11} {r['dtype']:8} {r['graph_us']:9.1f} "
              f"{r['eager_us']:9.1f} {r['gbs']:7.0f} {r['pct_copy']:6.1f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
