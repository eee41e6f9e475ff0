"""Fused residual add + RMSNorm: h = residual + x, y = h * rstd * w with rstd = 1 / sqrt(mean(h^2) + eps).

Numerics: the sum is formed in fp32 and rounded once to the input dtype; the norm is taken of that rounded h (the
tensor returned and saved for the backward), so the result equals the unfused `h = residual + x; rms_norm(h)`.
fp32 accumulation; bf16 or fp32 in and out; rstd saved in fp32.
Backward: dh_total = rstd * (w*dy - h * rstd^2 * mean(w*dy*h)) + dh, formed in fp32 and rounded once; it is the
gradient of both residual and x. dh (the gradient reaching h from the residual stream) may be None.
dw = sum over rows of dy * h * rstd, deterministic: per-block fp32 partial rows, then rms_norm's column reduction.
Shapes: any number of rows, hidden size up to 8192 (VALUES_PER_THREAD * 1024), odd sizes included. One block per row
(the backward: blocks loop over rows); each thread keeps its VALUES_PER_THREAD values of the row in registers, so every
input is read once and every output written once. Values travel as 8-byte words (4 bf16 or 2 fp32, _packed.py) when the
hidden size is a multiple of 4 / 2 and the tensors are 8-byte aligned (else one value per load); each thread issues
all its loads of a row before it computes.
"""

from __future__ import annotations

import math

import torch
from numba import cuda, float32, types

from .._packed import as_words, kernels_per_codec, per_word
from .._runtime import REDUCE_SLOTS, block_sum, ceil_div, dispatch, round_up, sm_count
from .rms_norm import column_sum

VALUES_PER_THREAD = 8  # 1024 threads x 8 values cover a hidden size of 8192 in one pass


def _threads_for(n_cols: int) -> int:
    if n_cols > VALUES_PER_THREAD * 1024:
        raise ValueError(f"fused_add_rms_norm supports a hidden size up to {VALUES_PER_THREAD * 1024}, got {n_cols}")
    return min(1024, max(32, round_up(ceil_div(n_cols, VALUES_PER_THREAD), 32)))


# ---------------------------------------------------------------------------------------------------- kernels
def _make_forward(codec):
    P = codec.per_word
    W = VALUES_PER_THREAD // P
    unpack, pack = codec.unpack, codec.pack
    word = getattr(types, codec.word)

    def fused_add_rms_norm_fwd(residual, x, w, y, h, rstd, eps):
        """residual, x, y, h: [rows, n] words of P values; w: [n] words."""
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        n = x.shape[1]
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        rw = cuda.local.array(W, word)
        xw = cuda.local.array(W, word)
        vals = cuda.local.array(VALUES_PER_THREAD, float32)
        for k in range(W):
            i = tid + k * stride
            if i < n:
                rw[k] = residual[row, i]
                xw[k] = x[row, i]
        sum_sq = float32(0.0)
        for k in range(W):
            i = tid + k * stride
            if i < n:
                for j in range(P):
                    vals[k * P + j] = unpack(rw[k], j) + unpack(xw[k], j)
                hw = pack(vals, k * P)  # h rounded once; the norm is of the rounded values
                h[row, i] = hw
                for j in range(P):
                    v = unpack(hw, j)
                    vals[k * P + j] = v
                    sum_sq += v * v
        total = block_sum(sum_sq, scratch)
        r = float32(1.0) / math.sqrt(total / float32(n * P) + eps)
        if tid == 0:
            rstd[row] = r
        for k in range(W):
            i = tid + k * stride
            if i < n:
                ww = w[i]
                for j in range(P):
                    vals[k * P + j] = vals[k * P + j] * r * unpack(ww, j)
                y[row, i] = pack(vals, k * P)

    return fused_add_rms_norm_fwd


def _make_backward(codec, with_dh: bool):
    P = codec.per_word
    W = VALUES_PER_THREAD // P
    unpack, pack = codec.unpack, codec.pack

    def fused_add_rms_norm_bwd(dy, dh, h, w, rstd, dh_total, dw_partial):
        """dy, dh, h, dh_total: [rows, n] words; w: [n] words; dw_partial: fp32 [blocks, n * P].
        `with_dh` is fixed at compile time; without it, `dh` is an unread placeholder."""
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        n = h.shape[1]
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        hs = cuda.local.array(VALUES_PER_THREAD, float32)
        parts = cuda.local.array(VALUES_PER_THREAD, float32)  # r * w * dy + dh: dh_total but for the mean term
        dw_acc = cuda.local.array(VALUES_PER_THREAD, float32)
        for k in range(VALUES_PER_THREAD):
            dw_acc[k] = float32(0.0)
        for row in range(cuda.blockIdx.x, h.shape[0], cuda.gridDim.x):
            r = rstd[row]
            dot = float32(0.0)
            # no stores in this loop: the compiler issues all its loads before their values are needed
            for k in range(W):
                i = tid + k * stride
                if i < n:
                    g_word = dy[row, i]
                    h_word = h[row, i]
                    w_word = w[i]
                    dh_word = dh[row, i] if with_dh else g_word
                    for j in range(P):
                        g = unpack(g_word, j)
                        hv = unpack(h_word, j)
                        gv = g * unpack(w_word, j)
                        part = r * gv
                        if with_dh:
                            part += unpack(dh_word, j)
                        dw_acc[k * P + j] += g * hv * r
                        hs[k * P + j] = hv
                        parts[k * P + j] = part
                        dot += gv * hv
            c = block_sum(dot, scratch) * r * r * r / float32(n * P)
            for k in range(W):
                i = tid + k * stride
                if i < n:
                    for j in range(P):
                        parts[k * P + j] -= hs[k * P + j] * c
                    dh_total[row, i] = pack(parts, k * P)
        for k in range(W):
            i = tid + k * stride
            if i < n:
                for j in range(P):
                    dw_partial[cuda.blockIdx.x, i * P + j] = dw_acc[k * P + j]

    return fused_add_rms_norm_bwd


_BACKWARD_SIGNATURE = (
    "void({w}[:, ::1], {w}[:, ::1], {w}[:, ::1], {w}[::1], float32[::1], {w}[:, ::1], float32[:, ::1])"
)
_forward = kernels_per_codec(
    _make_forward,
    "void({w}[:, ::1], {w}[:, ::1], {w}[::1], {w}[:, ::1], {w}[:, ::1], float32[::1], float32)",
    "fused_add_rms_norm_fwd",
    launch_bounds=1024,
)
_backward = kernels_per_codec(
    lambda codec: _make_backward(codec, with_dh=True), _BACKWARD_SIGNATURE, "fused_add_rms_norm_bwd", launch_bounds=1024
)
_backward_no_dh = kernels_per_codec(
    lambda codec: _make_backward(codec, with_dh=False),
    _BACKWARD_SIGNATURE,
    "fused_add_rms_norm_bwd_no_dh",
    launch_bounds=1024,
)


# ---------------------------------------------------------------------------------------------------- launchers
def _check(name: str, t: torch.Tensor, like: torch.Tensor):
    if t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(f"{name} must be {tuple(like.shape)} of {like.dtype}, got {tuple(t.shape)} of {t.dtype}")


def _check_weight(weight: torch.Tensor, x: torch.Tensor):
    if weight.dtype != x.dtype or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}] of {x.dtype}, got {tuple(weight.shape)} of {weight.dtype}")


def forward(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Numba kernel. residual, x [..., C] -> (y like x, h = residual + x like x, rstd fp32 [rows])."""
    _check("residual", residual, x)
    _check_weight(weight, x)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    r2 = residual.reshape(-1, n_cols).contiguous()
    y = torch.empty_like(x2)
    h = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        tensors = (r2, x2, weight, y, h)
        p = min(per_word(t, n_cols) for t in tensors)
        args = tuple(as_words(t, p) for t in tensors) + (rstd, eps)
        _forward[x.dtype, p].launch(x2.shape[0], _threads_for(n_cols), args)
    return y.view(x.shape), h.view(x.shape), rstd


def backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Numba kernel. Returns (dh_total like h, dweight like weight); dh may be None."""
    _check("dy", dy, h)
    if dh is not None:
        _check("dh", dh, h)
    _check_weight(weight, h)
    n_cols = h.shape[-1]
    h2 = h.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    dh2 = dy2 if dh is None else dh.reshape(-1, n_cols).contiguous()  # placeholder when None: never read
    rows = h2.shape[0]
    dh_total = torch.empty_like(h2)
    dweight = torch.empty_like(weight)
    threads = _threads_for(n_cols)
    # Enough blocks to fill the SMs (2048 threads each); each block keeps one fp32 partial row of dweight.
    blocks = max(1, min(rows, sm_count(h.device) * max(1, 2048 // threads)))
    partial = torch.empty(blocks, n_cols, dtype=torch.float32, device=h.device)
    if rows:
        kernels = _backward_no_dh if dh is None else _backward
        p = min(per_word(t, n_cols) for t in (dy2, dh2, h2, weight, dh_total))
        dy_w, dh_w, h_w, weight_w, dh_total_w = (as_words(t, p) for t in (dy2, dh2, h2, weight, dh_total))
        kernels[h.dtype, p].launch(blocks, threads, (dy_w, dh_w, h_w, weight_w, rstd, dh_total_w, partial))
        column_sum(partial, dweight)
    else:
        dweight.zero_()
    return dh_total.view(h.shape), dweight


# ---------------------------------------------------------------------------------------------------- reference
def reference_forward(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Plain torch math in fp32 (fp64 for fp64 inputs): the oracle for tests and the CPU path."""
    _check("residual", residual, x)
    compute = torch.promote_types(x.dtype, torch.float32)
    h = (residual.to(compute) + x.to(compute)).to(x.dtype)
    hf = h.to(compute)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = (hf * rstd * weight.to(compute)).to(x.dtype)
    return y, h, rstd.reshape(-1).to(torch.promote_types(rstd.dtype, torch.float32))


def reference_backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
                       rstd: torch.Tensor):
    compute = torch.promote_types(h.dtype, torch.float32)
    n_cols = h.shape[-1]
    hf = h.reshape(-1, n_cols).to(compute)
    g = dy.reshape(-1, n_cols).to(compute)
    r = rstd.reshape(-1, 1).to(compute)
    wdy = g * weight.to(compute)
    d = r * (wdy - hf * (r * r) * (wdy * hf).mean(-1, keepdim=True))
    if dh is not None:
        d = d + dh.reshape(-1, n_cols).to(compute)
    dweight = (g * hf * r).sum(0)
    return d.to(h.dtype).view(h.shape), dweight.to(weight.dtype)


fused_add_rms_norm_forward = dispatch(forward, reference_forward)
fused_add_rms_norm_backward = dispatch(backward, reference_backward)
