"""Kernel benchmark on the GPU: every op forward and backward at Qwen3 shapes against torch eager (and
Liger-Kernel when installed). GPU time comes from CUDA-graph replay (launch overhead excluded, as in training,
where the step is a CUDA graph); eager times with launch overhead are printed too.

Usage: python tools/bench/bench_kernels.py [--ops rms_norm,...] [--out benchmarks/kernels.csv]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import append_rows, copy_bandwidth_gbs, graph_ms, median_ms, queued_ms  # noqa: E402


# Inputs are drawn on the CPU and moved: a capture that fails (some peer code) leaves torch's CUDA generator unusable.
def _randn(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape).to(device=device, dtype=dtype)


def _randn_like(t):
    return _randn(*t.shape, device=t.device, dtype=t.dtype)


def _randint(low, high, shape, device="cpu"):
    return torch.randint(low, high, shape).to(device)


ROWS = 4096  # tokens per micro-step: 2 x 2048
HIDDEN = {"qwen3-0.6b": 1024, "qwen3-1.7b": 2048, "qwen3-4b": 2560, "qwen3-8b": 4096}


def bench_rms_norm(dtype):
    from surogate.kernels.ops import rms_norm

    rows_out = []
    for model, hidden in HIDDEN.items():
        x = _randn(ROWS, hidden, device="cuda", dtype=dtype)
        w = _randn(hidden, device="cuda", dtype=dtype)
        dy = _randn_like(x)
        y, rstd = rms_norm.forward(x, w, 1e-6)
        esize = x.element_size()
        fwd_bytes = 2 * x.numel() * esize + hidden * esize + ROWS * 4
        bwd_bytes = 3 * x.numel() * esize + ROWS * 4 + hidden * esize * 2
        cases = {
            "surogate": (lambda: rms_norm.forward(x, w, 1e-6), lambda: rms_norm.backward(dy, x, w, rstd)),
            "torch": (lambda: rms_norm.reference_forward(x, w, 1e-6), lambda: rms_norm.reference_backward(dy, x, w,
                      rstd)),
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
                gpu = queued_ms(fn) if provider == "liger" else graph_ms(fn)
                eager = median_ms(fn)
                rows_out.append(dict(op="rms_norm", provider=provider, mode=mode, model=model, hidden=hidden,
                                     dtype=str(dtype).split(".")[-1], graph_us=gpu * 1e3, eager_us=eager * 1e3,
                                     gbs=nbytes / (gpu if gpu == gpu else eager) / 1e6))
    return rows_out


NAN = float("nan")
VOCAB = {"qwen": 151936, "llama3": 128256}


def _peak_mib(fn) -> float:
    """Peak memory allocated by one call of `fn` beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _row(op, provider, mode, model, hidden, dtype, fn, nbytes=None, flops=None, peak=False):
    """One CSV row: CUDA-graph time (NaN when not capturable), eager time, GB/s and TFLOP/s from the better one."""
    gpu = queued_ms(fn) if provider.startswith("liger") else graph_ms(fn)
    eager = median_ms(fn)
    ms = gpu if gpu == gpu else eager
    return dict(op=op, provider=provider, mode=mode, model=model, hidden=hidden, dtype=str(dtype).split(".")[-1],
                graph_us=gpu * 1e3, eager_us=eager * 1e3, gbs=nbytes / ms / 1e6 if nbytes else NAN,
                tflops=flops / ms / 1e9 if flops else NAN, peak_mib=_peak_mib(fn) if peak else NAN)


def bench_cross_entropy(dtype):
    """CE forward + backward (dlogits in place) over [4096, V]. Bytes: the row read twice + written once (the
    kernel's real traffic; Liger's kernel moves the same). torch: F.cross_entropy on fp32 logits with autograd."""
    import torch.nn.functional as F

    from surogate.kernels.ops import cross_entropy

    rows_out = []
    for model, vocab in VOCAB.items():
        logits = _randn(ROWS, vocab, device="cuda", dtype=dtype)
        targets = _randint(0, vocab, (ROWS,), device="cuda")
        targets[::10] = -100
        nbytes = 3 * logits.numel() * logits.element_size()
        scale = torch.tensor(1.0 / ROWS, device="cuda")
        cases = {
            "surogate": lambda: cross_entropy.forward_backward(logits, targets, -100, scale),
            "surogate-loss": lambda: cross_entropy.forward(logits, targets, -100),
        }
        leaf = logits.clone().requires_grad_()

        def torch_ce():
            loss = F.cross_entropy(leaf.float(), targets)
            return torch.autograd.grad(loss, leaf)

        cases["torch"] = torch_ce
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            liger_loss, liger_in = LigerCrossEntropyLoss(), logits.clone().requires_grad_()
            cases["liger"] = lambda: liger_loss(liger_in, targets)  # its forward computes the gradient in place
        except Exception:
            pass
        for provider, fn in cases.items():
            mode = "loss" if provider.endswith("-loss") else "fwd+bwd"
            moved = nbytes // 3 if mode == "loss" else nbytes
            rows_out.append(_row("cross_entropy", provider.removesuffix("-loss"), mode, model, vocab, dtype, fn,
                                 nbytes=moved, peak=True))
        del logits, leaf
    return rows_out


def bench_fused_linear_cross_entropy(dtype):
    """lm_head + CE, loss and both gradients, [4096, C] x [151936, C]: time, TFLOP/s (6 * rows * V * C) and peak
    memory against the naive fp32-logits loss and Liger's fused linear CE (bf16 and fp32 weight-grad accumulation)."""
    import torch.nn.functional as F

    from surogate.kernels import fused_linear_cross_entropy

    rows_out = []
    vocab = VOCAB["qwen"]
    for model, hidden in HIDDEN.items():
        h = _randn(ROWS, hidden, device="cuda", dtype=dtype)
        w = _randn(vocab, hidden, device="cuda", dtype=dtype) * hidden**-0.5
        targets = _randint(0, vocab, (ROWS,), device="cuda")
        flops = 6 * ROWS * vocab * hidden
        scale = torch.tensor(1.0 / ROWS, device="cuda")
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()

        def naive():
            loss = F.cross_entropy((hg @ wg.t()).float(), targets)
            return torch.autograd.grad(loss, (hg, wg))

        cases = {
            "surogate": lambda: fused_linear_cross_entropy(h, w, targets, -100, scale, None, True),
            "torch": naive,
        }
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            for name, accum in (("liger", None), ("liger-fp32acc", torch.float32)):
                loss_fn = LigerFusedLinearCrossEntropyLoss(accum_dtype=accum)
                cases[name] = lambda fn=loss_fn: torch.autograd.grad(fn(wg, hg, targets), (hg, wg))
        except Exception:
            pass
        for provider, fn in cases.items():
            rows_out.append(_row("fused_linear_cross_entropy", provider, "fwd+bwd", model, hidden, dtype, fn,
                                 flops=flops, peak=True))
    return rows_out


def bench_embedding(dtype):
    """Lookup (read + write [4096, C]) and backward (read [4096, C], write [151936, C]) vs torch's kernels."""
    from surogate.kernels.ops import embedding

    rows_out = []
    vocab = VOCAB["qwen"]
    for model, hidden in HIDDEN.items():
        table = _randn(vocab, hidden, device="cuda", dtype=dtype)
        ids = _randint(0, vocab, (ROWS,), device="cuda")
        dx = _randn(ROWS, hidden, device="cuda", dtype=dtype)
        esize = table.element_size()
        fwd_bytes = 2 * ROWS * hidden * esize + ROWS * 8
        bwd_bytes = (vocab + ROWS) * hidden * esize + ROWS * 8
        cases = {
            "surogate": (lambda: embedding.forward(ids, table), lambda: embedding.backward(dx, ids, vocab)),
            "torch": (lambda: torch.nn.functional.embedding(ids, table),
                      lambda: torch.ops.aten.embedding_dense_backward(dx, ids, vocab, -1, False)),
        }
        for provider, (fwd, bwd) in cases.items():
            rows_out.append(_row("embedding", provider, "forward", model, hidden, dtype, fwd, nbytes=fwd_bytes))
            rows_out.append(_row("embedding", provider, "backward", model, hidden, dtype, bwd, nbytes=bwd_bytes))
    return rows_out


def bench_bias_grad(dtype):
    """Column sums of dy [4096, q|k|v] at Qwen2 sizes vs torch's dy.sum(0)."""
    from surogate.kernels import bias_grad

    rows_out = []
    for model, n_cols in {"qwen2-0.5b": 896 + 2 * 128, "qwen2-1.5b": 1536 + 2 * 256,
        "qwen2-7b": 3584 + 2 * 512}.items():
        dy = _randn(ROWS, n_cols, device="cuda", dtype=dtype)
        nbytes = dy.numel() * dy.element_size()
        for provider, fn in (("surogate", lambda: bias_grad(dy)), ("torch", lambda: dy.sum(0))):
            rows_out.append(_row("bias_grad", provider, "backward", model, n_cols, dtype, fn, nbytes=nbytes))
    return rows_out


def bench_abs_max(dtype):
    """abs-max (FP8 scaling) of weights and activations vs torch's x.abs().amax()."""
    from surogate.kernels import abs_max

    rows_out = []
    for name, shape in {"w-4096x4096": (4096, 4096), "emb-151936x1024": (151936, 1024),
                        "act-4096x24576": (ROWS, 24576)}.items():
        x = _randn(*shape, device="cuda", dtype=dtype)
        nbytes = x.numel() * x.element_size()
        for provider, fn in (("surogate", lambda: abs_max(x)), ("torch", lambda: x.abs().amax())):
            rows_out.append(_row("abs_max", provider, "forward", name, shape[-1], dtype, fn, nbytes=nbytes))
    return rows_out


def bench_adamw(dtype):
    """One AdamW step over flat buffers of a model's parameter count (grads in `dtype`, fp32 master and moments,
    bf16 work weights) vs torch's fused AdamW (fp32 grads) + the bf16 copy; and the global grad norm."""
    from surogate.kernels import adamw_step, global_grad_norm

    rows_out = []
    for model, n in {"qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976}.items():
        p = _randn(n, device="cuda")
        g = _randn(n, device="cuda", dtype=dtype)
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        work = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        lr, step = torch.tensor(1e-4, device="cuda"), torch.tensor(1.0, device="cuda")
        nbytes = n * (24 + g.element_size() + 2)
        hyper = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        cases = {
            "surogate": lambda: adamw_step(p, g, m, v, lr=lr, step=step, work_params=work, **hyper),
            "surogate-sr": lambda: adamw_step(p, g, m, v, lr=lr, step=step, work_params=work,
                                              stochastic_rounding=True, seed=1, **hyper),
        }
        if dtype == torch.float32:
            param = torch.nn.Parameter(p)
            param.grad = g
            optimizer = torch.optim.AdamW([param], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                          fused=True, capturable=True)

            def torch_step():
                optimizer.step()
                work.copy_(param.detach())

            cases["torch"] = torch_step
        for provider, fn in cases.items():
            rows_out.append(_row("adamw", provider, "step", model, n, dtype, fn, nbytes=nbytes))
        norm_bytes = n * g.element_size()
        for provider, fn in (("surogate", lambda: global_grad_norm(g)), ("torch", lambda: torch.linalg.vector_norm(g))):
            rows_out.append(_row("grad_norm", provider, "forward", model, n, dtype, fn, nbytes=norm_bytes))
        del p, g, m, v, work, cases
        torch.cuda.empty_cache()
    return rows_out


INTERMEDIATE = {"qwen3-0.6b": 3072, "qwen3-1.7b": 6144, "qwen3-4b": 9728, "qwen3-8b": 12288}
# (n_q, n_kv, head_dim, theta, rope_scaling)
ATTENTION = {
    "qwen3-0.6b": (16, 8, 128, 1e6, None),
    "qwen3-8b": (32, 8, 128, 1e6, None),
    "llama3.1-8b": (32, 8, 128, 5e5, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def _positions():
    """Position ids of 2 documents of 2048 tokens, int32 (what the trainer passes: no per-call int64 conversion)."""
    return torch.arange(2048, device="cuda", dtype=torch.int32).repeat(ROWS // 2048)


def bench_fused_add_rms_norm(dtype):
    """h = residual + x, y = rmsnorm(h). Bytes: forward reads residual, x and writes y, h; backward reads dy, dh, h
    and writes dh_total (plus the [hidden] weight and its gradient, rstd)."""
    from surogate.kernels.ops import fused_add_rms_norm as op

    rows_out = []
    for model, hidden in HIDDEN.items():
        residual = _randn(ROWS, hidden, device="cuda", dtype=dtype)
        x = _randn_like(residual)
        w = _randn(hidden, device="cuda", dtype=dtype)
        dy, dh = _randn_like(x), _randn_like(x)
        y, h, rstd = op.forward(residual, x, w, 1e-6)
        n = x.numel() * x.element_size()
        fwd_bytes = 4 * n + hidden * x.element_size() + ROWS * 4
        bwd_bytes = 4 * n + 2 * hidden * x.element_size() + ROWS * 4
        cases = {
            "surogate": (lambda: op.forward(residual, x, w, 1e-6), lambda: op.backward(dy, dh, h, w, rstd)),
            "torch": (lambda: op.reference_forward(residual, x, w, 1e-6),
                      lambda: op.reference_backward(dy, dh, h, w, rstd)),
        }
        try:
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

            xg, rg, wg = x.clone().requires_grad_(), residual.clone().requires_grad_(), w.clone().requires_grad_()
            yl, hl = LigerFusedAddRMSNormFunction.apply(xg, rg, wg, 1e-6, 0.0, "llama", False)
            cases["liger"] = (
                lambda: LigerFusedAddRMSNormFunction.apply(x, residual, w, 1e-6, 0.0, "llama", False),
                lambda: torch.autograd.grad((yl, hl), (xg, rg, wg), (dy, dh), retain_graph=True),
            )
        except Exception:
            pass
        for provider, (fwd, bwd) in cases.items():
            for mode, fn, nbytes in (("forward", fwd, fwd_bytes), ("backward", bwd, bwd_bytes)):
                rows_out.append(_row("fused_add_rms_norm", provider, mode, model, hidden, dtype, fn, nbytes=nbytes))
    return rows_out


def bench_rope(dtype):
    """RoPE in place on packed qkv [4096, (n_q + 2 n_kv) * d]. Bytes: the q and k heads read and written once.
    Liger rotates separate q [1, n_q, T, d] and k tensors with precomputed cos/sin [1, T, d] (read too)."""
    from surogate.kernels.ops import rope

    rows_out = []
    for model, (n_q, n_kv, head_dim, theta, scaling) in ATTENTION.items():
        qkv = _randn(ROWS, (n_q + 2 * n_kv) * head_dim, device="cuda", dtype=dtype)
        d_qkv = _randn_like(qkv)
        pos = _positions()
        inv_freq = rope.rope_inv_freq(head_dim, theta, scaling).cuda()
        args = (pos, inv_freq, n_q, n_kv, head_dim)
        nbytes = 2 * ROWS * (n_q + n_kv) * head_dim * qkv.element_size() + ROWS * 4
        cases = {
            "surogate": (lambda: rope.forward(qkv, *args), lambda: rope.backward(d_qkv, *args)),
            "torch": (lambda: rope.reference_forward(qkv, *args), lambda: rope.reference_backward(d_qkv, *args)),
        }
        try:
            from liger_kernel.ops.rope import LigerRopeFunction

            q = _randn(1, n_q, ROWS, head_dim, device="cuda", dtype=dtype)
            k = _randn(1, n_kv, ROWS, head_dim, device="cuda", dtype=dtype)
            angle = pos.float()[:, None] * inv_freq[None, :]
            cos = torch.cat([angle, angle], -1).cos().to(dtype)[None]
            sin = torch.cat([angle, angle], -1).sin().to(dtype)[None]
            qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
            ql, kl = LigerRopeFunction.apply(qg, kg, cos, sin)
            dq, dk = _randn_like(q), _randn_like(k)
            cases["liger"] = (lambda: LigerRopeFunction.apply(q, k, cos, sin),
                              lambda: torch.autograd.grad((ql, kl), (qg, kg), (dq, dk), retain_graph=True))
        except Exception:
            pass
        for provider, (fwd, bwd) in cases.items():
            rows_out.append(_row("rope", provider, "forward", model, head_dim, dtype, fwd, nbytes=nbytes))
            rows_out.append(_row("rope", provider, "backward", model, head_dim, dtype, bwd, nbytes=nbytes))
    return rows_out


def bench_qk_norm_rope(dtype):
    """Qwen3 q/k RMSNorm + RoPE in place on packed qkv. Bytes: forward reads and writes the q and k heads (+ rstd);
    backward reads the gradient and the saved pre-norm q/k, writes the gradient (+ rstd). torch: the unfused eager
    reference (no Liger equivalent)."""
    from surogate.kernels.ops import qk_norm_rope, rope

    rows_out = []
    for model, (n_q, n_kv, head_dim, theta, scaling) in ATTENTION.items():
        if not model.startswith("qwen3"):
            continue
        qkv = _randn(ROWS, (n_q + 2 * n_kv) * head_dim, device="cuda", dtype=dtype)
        saved = qkv.clone()
        d_qkv = _randn_like(qkv)
        qw = _randn(head_dim, device="cuda", dtype=dtype)
        kw = _randn_like(qw)
        pos = _positions()
        inv_freq = rope.rope_inv_freq(head_dim, theta, scaling).cuda()
        heads = (n_q, n_kv, head_dim)
        _, rstd = qk_norm_rope.forward(qkv, qw, kw, pos, inv_freq, *heads, 1e-6)
        qk = ROWS * (n_q + n_kv) * head_dim * qkv.element_size()
        fwd_bytes = 2 * qk + rstd.numel() * 4
        bwd_bytes = 3 * qk + rstd.numel() * 4
        cases = {
            "surogate": (lambda: qk_norm_rope.forward(qkv, qw, kw, pos, inv_freq, *heads, 1e-6),
                         lambda: qk_norm_rope.backward(d_qkv, saved, qw, kw, rstd, pos, inv_freq, *heads)),
            "torch": (lambda: qk_norm_rope.reference_forward(qkv, qw, kw, pos, inv_freq, *heads, 1e-6),
                      lambda: qk_norm_rope.reference_backward(d_qkv, saved, qw, kw, rstd, pos, inv_freq, *heads)),
        }
        for provider, (fwd, bwd) in cases.items():
            rows_out.append(_row("qk_norm_rope", provider, "forward", model, head_dim, dtype, fwd, nbytes=fwd_bytes))
            rows_out.append(_row("qk_norm_rope", provider, "backward", model, head_dim, dtype, bwd, nbytes=bwd_bytes))
    return rows_out


def bench_swiglu(dtype):
    """h = silu(gate) * up over gate_up [4096, 2I]. Bytes: forward reads 2I, writes I a row; backward reads dh (I)
    and gate_up (2I), writes d_gate_up (2I). Liger's SiLUMul takes gate and up as separate tensors."""
    from surogate.kernels.ops import swiglu

    rows_out = []
    for model, inter in INTERMEDIATE.items():
        gate_up = _randn(ROWS, 2 * inter, device="cuda", dtype=dtype)
        dh = _randn(ROWS, inter, device="cuda", dtype=dtype)
        esize = gate_up.element_size()
        fwd_bytes = 3 * ROWS * inter * esize
        bwd_bytes = 5 * ROWS * inter * esize
        cases = {
            "surogate": (lambda: swiglu.forward(gate_up), lambda: swiglu.backward(dh, gate_up)),
            "torch": (lambda: swiglu.reference_forward(gate_up), lambda: swiglu.reference_backward(dh, gate_up)),
        }
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            a, b = gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous()
            ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
            hl = LigerSiLUMulFunction.apply(ag, bg)
            cases["liger"] = (lambda: LigerSiLUMulFunction.apply(a, b),
                              lambda: torch.autograd.grad(hl, (ag, bg), dh, retain_graph=True))
        except Exception:
            pass
        for provider, (fwd, bwd) in cases.items():
            rows_out.append(_row("swiglu", provider, "forward", model, inter, dtype, fwd, nbytes=fwd_bytes))
            rows_out.append(_row("swiglu", provider, "backward", model, inter, dtype, bwd, nbytes=bwd_bytes))
    return rows_out


BENCHES = {
    "rms_norm": bench_rms_norm,
    "cross_entropy": bench_cross_entropy,
    "fused_linear_cross_entropy": bench_fused_linear_cross_entropy,
    "embedding": bench_embedding,
    "bias_grad": bench_bias_grad,
    "abs_max": bench_abs_max,
    "adamw": bench_adamw,
    "fused_add_rms_norm": bench_fused_add_rms_norm,
    "rope": bench_rope,
    "qk_norm_rope": bench_qk_norm_rope,
    "swiglu": bench_swiglu,
}


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
    width = max(len(r["op"]) for r in rows)
    print(f"{'op':{width}} {'provider':13} {'mode':8} {'model':15} {'dtype':8} {'graph us':>9} {'eager us':>9} "
          f"{'GB/s':>7} {'%copy':>6} {'TFLOP/s':>7} {'peak MiB':>8}")
    for r in rows:
        r.update(date=stamp, gpu=gpu, pct_copy=100 * r["gbs"] / copy)
        print(f"{r['op']:{width}} {r['provider']:13} {r['mode']:8} {r['model']:15} {r['dtype']:8} {r['graph_us']:9.1f} "
              f"{r['eager_us']:9.1f} {r['gbs']:7.0f} {r['pct_copy']:6.1f} {r.get('tflops', NAN):7.1f} "
              f"{r.get('peak_mib', NAN):8.0f}")
    append_rows(args.out, rows)  # long format: rows kept, header grows with new columns


if __name__ == "__main__":
    main()
