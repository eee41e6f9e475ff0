"""fp8-hybrid vs bf16 for one decoder layer's four linear layers (qkv, o, gate_up, down) at Qwen3-4B / 8B shapes:
forward + backward through surogate.quant.Recipe, timed as CUDA-graph replays (GPU time, as in training).

Variants per GEMM set, all at 4096 tokens (2 x 2048):
  bf16         torch.matmul (cuBLAS BF16, fp32 accumulation)
  fp8-old      the first fp8-hybrid: W quantised for every GEMM (abs-max + encode in forward, abs-max + encode-
               transpose in dgrad), dy scaled just in time (abs-max pass), inverse scales recomputed per GEMM
               (Recipe(cache_weights=False, grad_scaling="current"))
  fp8          now: W quantised once per optimizer step into a cache of both layouts, dy at the delayed scale
               (one encode pass, both layouts when wgrad needs them), kept inverse scales
(both fp8 variants run the forward GEMM with cuBLASLt fast accumulation, as TE's fprop; the pass section times
the FP8 GEMM with and without it) and two training modes: lora (frozen W: forward + dgrad, as for the 0.85x
measured in RESULTS.md) and full (forward + dgrad + wgrad). The fp8 row of full mode also times the once-per-step
weight re-quantisation (after_optimizer_step), amortised over --accum micro-steps.

A breakdown at each shape times every pass alone (bf16 GEMM, FP8 GEMM, encode of x, encode of dy, encode_both,
encode_transpose, abs-max) with its bytes and achieved GB/s, and the accounting
    saved by FP8 GEMMs  vs  added by quantisation passes
that decides the speedup. Prints a table; appends rows to --out (long format).

    python tools/bench/bench_fp8_gemm.py [--models qwen3-4b,qwen3-8b] [--out $OUT/fp8_gemm.csv]
    python tools/bench/bench_fp8_gemm.py --device cpu --tokens 64 --models qwen3-0.6b --out ''   # smoke run
"""

# ruff: noqa: B023  (each lambda is timed inside the loop iteration that defines it)
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import append_rows, copy_bandwidth_gbs, graph_ms  # noqa: E402

TOKENS = 4096
DEVICE = "cuda"
# hidden, intermediate, q heads, kv heads, head_dim
MODELS = {"qwen3-4b": (2560, 9728, 32, 8, 128), "qwen3-8b": (4096, 12288, 32, 8, 128),
          "qwen3-0.6b": (1024, 3072, 16, 8, 128)}  # fmt: skip


def linears(model: str) -> dict[str, tuple[int, int]]:
    """name -> (K in, N out) of the layer's four base GEMMs."""
    h, i, nq, nkv, d = MODELS[model]
    return {"qkv": (h, (nq + 2 * nkv) * d), "o": (nq * d, h), "gate_up": (h, 2 * i), "down": (i, h)}


def _randn(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(torch.bfloat16)


def _time_ms(fn) -> float:
    """CUDA-graph replay time on the GPU; on CPU (smoke runs) a wall-clock mean of 3 calls."""
    if DEVICE == "cuda":
        return graph_ms(fn)
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def bench_layer(model: str, accum: int) -> list[dict]:
    from surogate.quant import Recipe

    rows = []
    shapes = linears(model)
    for mode in ("lora", "full"):
        totals = {}
        for variant in ("bf16", "fp8-old", "fp8"):
            if variant == "bf16":
                recipe = Recipe("bf16", n_layers=1)
            else:
                old = variant == "fp8-old"
                recipe = Recipe("fp8-hybrid", n_layers=1, cache_weights=not old,
                                grad_scaling="current" if old else "delayed")
            tensors = []
            for name, (k, n) in shapes.items():
                w = torch.nn.Parameter(_randn(n, k, scale=0.02), requires_grad=mode == "full")
                tensors.append((recipe.linear(name, 0), _randn(TOKENS, k), w, _randn(TOKENS, n, scale=1e-3)))

            def layer():
                for ctx, x, w, dy in tensors:
                    recipe.forward(x, w, ctx)
                    recipe.backward(dy, x, w, ctx, need_dw=mode == "full")

            ms = _time_ms(layer)
            per_step = float("nan")
            if variant == "fp8" and mode == "full":
                layer()  # the cache exists; time its re-quantisation (eager: it runs once per optimizer step)
                per_step = _time_ms(recipe.after_optimizer_step)
                ms_step = ms + per_step / accum
            else:
                ms_step = ms
            totals[variant] = ms_step
            flops = sum(2 * TOKENS * k * n for k, n in shapes.values()) * (3 if mode == "full" else 2)
            rows.append(dict(section="layer", model=model, mode=mode, variant=variant, case="4 linears",
                             graph_us=ms * 1e3, requant_us=per_step * 1e3, us_per_microstep=ms_step * 1e3,
                             tflops=flops / ms_step / 1e9))
        for r in rows[-3:]:
            r["speedup_vs_bf16"] = totals["bf16"] / r["us_per_microstep"] * 1e3
    return rows


def bench_passes(model: str, copy_gbs: float) -> list[dict]:
    """Each pass alone at the layer's shapes: what an FP8 GEMM saves and what quantising costs."""
    from surogate.quant import fp8

    rows = []
    for name, (k, n) in linears(model).items():
        x, w, dy = _randn(TOKENS, k), _randn(n, k, scale=0.02), _randn(TOKENS, n, scale=1e-3)
        scale, amax = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
        xq, wq = fp8.encode(x, scale), fp8.encode(w, scale)
        dyq, wq_t = fp8.encode(dy, scale, "e5m2"), fp8.encode_transpose(w, scale)
        one = torch.ones((), device=DEVICE)
        e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
        m_k, m_n, n_k = TOKENS * k, TOKENS * n, n * k
        passes = {
            "gemm_fwd_bf16": (lambda: torch.matmul(x, w.t()), 0, 2 * TOKENS * k * n),
            "gemm_fwd_fp8": (lambda: torch._scaled_mm(xq.view(e4), wq.view(e4).t(), scale_a=one, scale_b=one,
                                                      out_dtype=torch.bfloat16, use_fast_accum=True), 0,
                             2 * TOKENS * k * n),
            "gemm_fwd_fp8_split_acc": (lambda: torch._scaled_mm(xq.view(e4), wq.view(e4).t(), scale_a=one,
                                                                scale_b=one, out_dtype=torch.bfloat16), 0,
                                       2 * TOKENS * k * n),
            "gemm_dgrad_bf16": (lambda: torch.matmul(dy, w), 0, 2 * TOKENS * k * n),
            "gemm_dgrad_fp8": (lambda: torch._scaled_mm(dyq.view(e5), wq_t.view(e4).t(), scale_a=one, scale_b=one,
                                                        out_dtype=torch.bfloat16), 0, 2 * TOKENS * k * n),
            "encode_x(bf16x4)": (lambda: fp8.encode(x, scale, "e4m3", amax), 3 * m_k, 0),
            "encode_dy(bf16x4)": (lambda: fp8.encode(dy, scale, "e5m2", amax), 3 * m_n, 0),
            "encode_both_dy": (lambda: fp8.encode_both(dy, scale, "e5m2", amax), 4 * m_n, 0),
            "encode_transpose_x": (lambda: fp8.encode_transpose(x, scale, "e4m3"), 3 * m_k, 0),
            "abs_max_dy": (lambda: fp8.abs_max(dy), 2 * m_n, 0),
            "abs_max_w": (lambda: fp8.abs_max(w), 2 * n_k, 0),
            "encode_w": (lambda: fp8.encode(w, scale), 3 * n_k, 0),
            "encode_transpose_w": (lambda: fp8.encode_transpose(w, scale), 3 * n_k, 0),
            "scale_from_amax": (lambda: fp8.scale_from_amax(amax, "e5m2"), 0, 0),
            "torch_cast_e4m3": (lambda: (x.float() * scale).clamp(-448, 448).to(e4), 3 * m_k, 0),
        }
        for op, (fn, nbytes, flops) in passes.items():
            ms = _time_ms(fn)
            rows.append(dict(section="pass", model=model, case=f"{name} [{TOKENS}x{k}]x[{k}x{n}]", variant=op,
                             graph_us=ms * 1e3, gbs=nbytes / ms / 1e6 if nbytes else float("nan"),
                             pct_copy=100 * nbytes / ms / 1e6 / copy_gbs if nbytes else float("nan"),
                             tflops=flops / ms / 1e9 if flops else float("nan")))
    return rows


def account(rows: list[dict], model: str) -> list[str]:
    """Per GEMM set: time saved by the FP8 GEMMs vs time of the passes each variant adds (LoRA: fwd + dgrad)."""
    t = {(r["case"].split(" ")[0], r["variant"]): r["graph_us"] for r in rows if r["section"] == "pass"}
    lines = []
    for name in linears(model):
        saved = (t[name, "gemm_fwd_bf16"] - t[name, "gemm_fwd_fp8"]) + (t[name, "gemm_dgrad_bf16"]
                                                                          - t[name, "gemm_dgrad_fp8"])
        old = (t[name, "encode_x(bf16x4)"] + t[name, "abs_max_w"] * 2 + t[name, "encode_w"]
               + t[name, "encode_transpose_w"] + t[name, "abs_max_dy"] + t[name, "encode_dy(bf16x4)"]
               + 6 * t[name, "scale_from_amax"])
        new = t[name, "encode_x(bf16x4)"] + t[name, "encode_dy(bf16x4)"]
        lines.append(f"  {model} {name:8} LoRA fwd+dgrad: FP8 GEMMs save {saved:7.1f} us; passes add "
                     f"{old:7.1f} us (old: W twice, abs-max of dy) -> net {saved - old:+7.1f}; now {new:6.1f} us "
                     f"(x and dy encodes) -> net {saved - new:+7.1f}")
    return lines


def main():
    global TOKENS, DEVICE
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="qwen3-4b,qwen3-8b")
    p.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step (amortises re-quantising W)")
    p.add_argument("--out", default="benchmarks/fp8_gemm.csv")
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the code paths")
    args = p.parse_args()
    TOKENS, DEVICE = args.tokens, args.device
    copy = copy_bandwidth_gbs() if DEVICE == "cuda" else float("nan")
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"# {gpu}; device copy bandwidth {copy:.0f} GB/s (read + write); {TOKENS} tokens")
    rows, notes = [], []
    for model in args.models.split(","):
        passes = bench_passes(model, copy)
        rows += passes + bench_layer(model, args.accum)
        notes += account(passes, model)
    stamp = datetime.date.today().isoformat()
    print(f"{'section':7} {'model':10} {'mode':5} {'variant':20} {'case':34} {'us':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'TFLOP/s':>8} {'x bf16':>6}")
    for r in rows:
        r.update(date=stamp, gpu=gpu)
        us = r.get("us_per_microstep", r["graph_us"])
        print(f"{r['section']:7} {r['model']:10} {r.get('mode', ''):5} {r['variant']:20} {r['case']:34} {us:9.1f} "
              f"{r.get('gbs', float('nan')):7.0f} {r.get('pct_copy', float('nan')):6.1f} "
              f"{r.get('tflops', float('nan')):8.1f} {r.get('speedup_vs_bf16', float('nan')):6.2f}")
    print("\n# accounting per GEMM set (LoRA: forward + dgrad)")
    print("\n".join(notes))
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
