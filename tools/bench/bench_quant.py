"""surogate-quant benchmark on the GPU: format kernels (GB/s against the device copy bandwidth), the 8-bit AdamW
step, and a linear layer's three GEMMs under each recipe at Qwen3 shapes (TFLOP/s; fp8-hybrid vs bf16 speedup).
GPU time comes from CUDA-graph replay (launch overhead excluded, as in training).

Usage: python tools/bench/bench_quant.py [--only kernels,adamw,gemms] [--out benchmarks/quant.csv]
"""

# ruff: noqa: B023  (each lambda is timed inside the loop iteration that defines it)
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import append_rows, copy_bandwidth_gbs, graph_ms, median_ms  # noqa: E402

NAN = float("nan")
TOKENS = 4096  # 2 x 2048 per micro-step
# (hidden, intermediate) of the Qwen3 shapes in the issue
MODELS = {"qwen3-0.6b": (1024, 3072), "qwen3-4b": (2560, 9728), "qwen3-8b": (4096, 12288)}


def _randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape) * scale).to(device="cuda", dtype=dtype)


def _row(op, provider, case, fn, nbytes=NAN, flops=NAN):
    gpu = graph_ms(fn)
    eager = median_ms(fn)
    t = gpu if gpu == gpu else eager
    return dict(op=op, provider=provider, case=case, graph_us=gpu * 1e3, eager_us=eager * 1e3,
                gbs=nbytes / t / 1e6, tflops=flops / t / 1e9)


def bench_kernels():
    from surogate.quant import fp8, fp8_block, nf4, nvfp4

    rows = []
    for name, shape in {"act-4096x4096": (TOKENS, 4096), "act-4096x12288": (TOKENS, 12288)}.items():
        x = _randn(*shape)
        n = x.numel()
        scale = torch.ones(1, device="cuda")
        amax = torch.zeros(1, device="cuda")
        codes = fp8.encode(x, scale, "e4m3")
        rows.append(_row("fp8_encode+amax", "surogate", name, lambda: fp8.encode(x, scale, "e4m3", amax), 3 * n))
        rows.append(_row("fp8_encode", "torch", name, lambda: (x.float() * scale).clamp(-448, 448).to(
            torch.float8_e4m3fn), 3 * n))
        rows.append(_row("fp8_decode", "surogate", name, lambda: fp8.decode(codes, scale, "e4m3"), 3 * n))
        rows.append(_row("fp8_encode_transpose", "surogate", name, lambda: fp8.encode_transpose(x, scale), 3 * n))
        rows.append(_row("nvfp4_quantize_1d", "surogate", name, lambda: nvfp4.quantize(x), 2 * n + n // 2 + n // 16))
        rows.append(_row("nvfp4_quantize_sr", "surogate", name, lambda: nvfp4.quantize(x, stochastic=True, seed=1),
                         2 * n + n // 2 + n // 16))
        rows.append(_row("hadamard16", "surogate", name, lambda: nvfp4.hadamard16(x, 1), 4 * n))
    for name, shape in {"w-4096x4096": (4096, 4096), "w-12288x4096": (12288, 4096)}.items():
        w = _randn(*shape, scale=0.02)
        n = w.numel()
        packed = nf4.quantize(w)
        rows.append(_row("nf4_dequantize", "surogate", name, lambda: nf4.dequantize(packed, torch.bfloat16),
                         packed.nbytes + 2 * n))
        try:
            import bitsandbytes.functional as bnb

            q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            rows.append(_row("nf4_dequantize", "bitsandbytes", name, lambda: bnb.dequantize_4bit(q, state),
                             packed.nbytes + 2 * n))
        except Exception as e:  # not installed, or no CUDA build
            print(f"# bitsandbytes skipped: {type(e).__name__}")
        tiles = fp8_block.quantize(w)
        rows.append(_row("fp8_block_dequantize", "surogate", name, lambda: fp8_block.dequantize(tiles), 3 * n))
        t4 = nvfp4.quantize(w)
        rows.append(_row("nvfp4_dequantize", "surogate", name, lambda: nvfp4.dequantize(t4), t4.nbytes + 2 * n))
        rows.append(_row("nf4_quantize", "surogate", name, lambda: nf4.quantize(w), 2 * n + packed.nbytes))
    return rows


def bench_adamw():
    from surogate.quant.optim import AdamW8bitState, adamw8bit_step

    rows = []
    n = 596_049_920  # qwen3-0.6b parameters
    p = _randn(n, dtype=torch.float32)
    g = _randn(n)
    work = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    state = AdamW8bitState.zeros(n, "cuda")
    lr, step = torch.tensor(1e-4, device="cuda"), torch.tensor(3.0, device="cuda")

    def step8():
        adamw8bit_step(p, g, state, lr=lr, step=step, weight_decay=0.1, work_params=work)

    rows.append(_row("adamw8bit", "surogate", "qwen3-0.6b", step8, n * (4 + 4 + 2 + 2 + 2 + 2)))
    try:
        from surogate.kernels import adamw_step

        m, v = torch.zeros_like(p), torch.zeros_like(p)
        rows.append(_row("adamw_fp32_states", "surogate", "qwen3-0.6b", lambda: adamw_step(
            p, g, m, v, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step, work_params=work),
            n * (24 + 2 + 2)))
    except ImportError:
        pass
    return rows


def bench_gemms():
    """forward + dgrad + wgrad of the q/o-, up- and down-projection shapes at 4096 tokens, per recipe."""
    from surogate.quant import Recipe

    rows = []
    for model, (hidden, inter) in MODELS.items():
        shapes = {"o_proj": (hidden, hidden), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        for proj, (k, n) in shapes.items():
            x, w, dy = _randn(TOKENS, k), _randn(n, k, scale=0.02), _randn(TOKENS, n)
            flops = 3 * 2 * TOKENS * k * n
            times = {}
            for name in ("bf16", "fp8-hybrid", "nvfp4"):
                recipe = Recipe(name, n_layers=1)
                ctx = recipe.linear(proj, 0)

                def step(recipe=recipe, ctx=ctx):
                    recipe.forward(x, w, ctx)
                    recipe.backward(dy, x, w, ctx)

                row = _row("linear_fwd_bwd", name, f"{model}/{proj}", step, flops=flops)
                times[name] = row["graph_us"]
                rows.append(row)
            rows[-2]["speedup_vs_bf16"] = times["bf16"] / times["fp8-hybrid"]
    return rows


SECTIONS = {"kernels": bench_kernels, "adamw": bench_adamw, "gemms": bench_gemms}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--out", default="benchmarks/quant.csv")
    args = parser.parse_args()
    copy = copy_bandwidth_gbs()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}; device copy bandwidth {copy:.0f} GB/s (read + write)")
    rows = []
    for section in args.only.split(","):
        rows += SECTIONS[section]()
    stamp = datetime.date.today().isoformat()
    print(f"{'op':22} {'provider':13} {'case':26} {'graph us':>9} {'eager us':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'TFLOP/s':>8} {'x bf16':>6}")
    for r in rows:
        r.update(date=stamp, gpu=gpu, pct_copy=100 * r["gbs"] / copy)
        print(f"{r['op']:22} {r['provider']:13} {r['case']:26} {r['graph_us']:9.1f} {r['eager_us']:9.1f} "
              f"{r['gbs']:7.0f} {r['pct_copy']:6.1f} {r['tflops']:8.1f} {r.get('speedup_vs_bf16', NAN):6.2f}")
    append_rows(args.out, rows)  # long format: rows kept, header grows with new columns


if __name__ == "__main__":
    main()
