"""RMSNorm: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), over the last dimension.

Numerics: fp32 accumulation; bf16 or fp32 in and out, rounded once; rstd saved in fp32 for the backward.
Backward: dx = rstd * (w*dy - x * rstd^2 * mean(w*dy*x)); dw = sum over rows of dy * x * rstd, reduced
deterministically (per-block partial sums in fp32, then one column reduction), no atomics.
Shapes: any number of rows, hidden size up to 8192 (MAX_PER_THREAD * 1024), odd sizes included.
Registers: each thread keeps its MAX_PER_THREAD values of a row in registers; launch_bounds=1024 caps the kernels
at 64 registers a thread so that 1024-thread blocks launch (without it the backward failed for hidden >= 2560 on the
H100 with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES).
"""

from __future__ import annotations

import math

import torch
from numba import cuda, float32

from .._runtime import REDUCE_SLOTS, SIMULATOR, block_sum, ceil_div, dispatch, kernels_per_dtype, round_up, sm_count

MAX_PER_THREAD = 8  # values of a row each thread keeps in registers; hidden <= 8 * 1024
ELEMENTS_PER_THREAD = 8  # target: 1024 threads cover a hidden size of 8192 in one pass


def _threads_for(n_cols: int) -> int:
    if n_cols > MAX_PER_THREAD * 1024:
        raise ValueError(f"RMSNorm supports a hidden size up to {MAX_PER_THREAD * 1024}, got {n_cols}")
    return min(1024, max(32, round_up(ceil_div(n_cols, ELEMENTS_PER_THREAD), 32)))


# ---------------------------------------------------------------------------------------------------- kernels
def _make_forward(load, store):
    def rms_norm_fwd(x, w, y, rstd, eps):
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        n = x.shape[1]
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        vals = cuda.local.array(MAX_PER_THREAD, float32)
        sum_sq = float32(0.0)
        for k in range(MAX_PER_THREAD):
            i = tid + k * stride
            v = float32(0.0)
            if i < n:
                v = load(x[row, i])
            vals[k] = v
            sum_sq += v * v
        total = block_sum(sum_sq, scratch)
        r = float32(1.0) / math.sqrt(total / float32(n) + eps)
        if tid == 0:
            rstd[row] = r
        for k in range(MAX_PER_THREAD):
            i = tid + k * stride
            if i < n:
                y[row, i] = store(vals[k] * r * load(w[i]))

    return rms_norm_fwd


def _make_backward(load, store):
    def rms_norm_bwd(dy, x, w, rstd, dx, dw_partial):
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        n = x.shape[1]
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        xs = cuda.local.array(MAX_PER_THREAD, float32)
        wdys = cuda.local.array(MAX_PER_THREAD, float32)
        dw_acc = cuda.local.array(MAX_PER_THREAD, float32)
        for k in range(MAX_PER_THREAD):
            dw_acc[k] = float32(0.0)
        for row in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
            r = rstd[row]
            dot = float32(0.0)
            for k in range(MAX_PER_THREAD):
                i = tid + k * stride
                xv = float32(0.0)
                gv = float32(0.0)
                if i < n:
                    xv = load(x[row, i])
                    g = load(dy[row, i])
                    gv = g * load(w[i])
                    dw_acc[k] += g * xv * r
                xs[k] = xv
                wdys[k] = gv
                dot += gv * xv
            c = block_sum(dot, scratch) * r * r / float32(n)
            for k in range(MAX_PER_THREAD):
                i = tid + k * stride
                if i < n:
                    dx[row, i] = store(r * (wdys[k] - xs[k] * c))
        for k in range(MAX_PER_THREAD):
            i = tid + k * stride
            if i < n:
                dw_partial[cuda.blockIdx.x, i] = dw_acc[k]

    return rms_norm_bwd


COLUMN_TILE = 32  # columns per block of the column reduction (one warp wide: coalesced 128-byte rows)
ROW_GROUPS = 4 if SIMULATOR else 32  # threads down the rows per column; their partial sums are added in a fixed order


def _make_column_sum(load, store):
    def column_sum(partial, out):
        """out[j] = sum_i partial[i, j] over fp32 partials, in a fixed order (deterministic)."""
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        j = cuda.blockIdx.x * COLUMN_TILE + tx
        sums = cuda.shared.array((ROW_GROUPS, COLUMN_TILE), float32)
        acc = float32(0.0)
        if j < partial.shape[1]:
            for i in range(ty, partial.shape[0], ROW_GROUPS):
                acc += partial[i, j]
        sums[ty, tx] = acc
        cuda.syncthreads()
        if ty == 0 and j < partial.shape[1]:
            total = float32(0.0)
            for g in range(ROW_GROUPS):
                total += sums[g, tx]
            out[j] = store(total)

    return column_sum


def column_sum(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[j] = sum_i partial[i, j] for fp32 partials [blocks, n] (out fp32 or bf16 [n]). Shared by ops that reduce
    per-block partial sums deterministically."""
    _column_sum[out.dtype].launch((ceil_div(partial.shape[1], COLUMN_TILE),), (COLUMN_TILE, ROW_GROUPS), (partial, out))
    return out


_forward = kernels_per_dtype(
    _make_forward,
    "void({t}[:, ::1], {t}[::1], {t}[:, ::1], float32[::1], float32)",
    "rms_norm_fwd",
    launch_bounds=1024,
)
_backward = kernels_per_dtype(
    _make_backward,
    "void({t}[:, ::1], {t}[:, ::1], {t}[::1], float32[::1], {t}[:, ::1], float32[:, ::1])",
    "rms_norm_bwd",
    launch_bounds=1024,
)
_column_sum = kernels_per_dtype(_make_column_sum, "void(float32[:, ::1], {t}[::1])", "column_sum")


# ---------------------------------------------------------------------------------------------------- launchers
def _check(x: torch.Tensor, weight: torch.Tensor):
    if weight.dtype != x.dtype or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}] of {x.dtype}, got {tuple(weight.shape)} of {weight.dtype}")


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Numba kernel. x [..., C] -> (y like x, rstd fp32 [rows])."""
    _check(x, weight)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _forward[x.dtype].launch(
            x2.shape[0], _threads_for(x2.shape[1]), (x2, weight, y, rstd, eps)
        )
    return y.view(x.shape), rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Numba kernel. Returns (dx like x, dweight like weight)."""
    _check(x, weight)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    rows = x2.shape[0]
    dx = torch.empty_like(x2)
    dweight = torch.empty_like(weight)
    threads = _threads_for(n_cols)
    # Enough blocks to fill the SMs (2048 threads each); each block keeps one fp32 partial row of dweight.
    blocks = max(1, min(rows, sm_count(x.device) * max(1, 2048 // threads)))
    partial = torch.empty(blocks, n_cols, dtype=torch.float32, device=x.device)
    if rows:
        _backward[x.dtype].launch(
            blocks,
            threads,
            (dy2, x2, weight, rstd, dx, partial),
        )
        column_sum(partial, dweight)
    else:
        dweight.zero_()
    return dx.view(x.shape), dweight


# ---------------------------------------------------------------------------------------------------- reference
def reference_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Plain torch math in fp32 (or fp64 for fp64 inputs): the oracle for tests and the CPU path."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (xf * rstd * weight.to(compute)).to(x.dtype)
    return y, rstd.reshape(-1).to(torch.promote_types(rstd.dtype, torch.float32))


def reference_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    compute = torch.promote_types(x.dtype, torch.float32)
    n_cols = x.shape[-1]
    xf = x.reshape(-1, n_cols).to(compute)
    g = dy.reshape(-1, n_cols).to(compute)
    r = rstd.reshape(-1, 1).to(compute)
    wdy = g * weight.to(compute)
    dx = r * (wdy - xf * (r * r) * (wdy * xf).mean(-1, keepdim=True))
    dweight = (g * xf * r).sum(0)
    return dx.to(x.dtype).view(x.shape), dweight.to(weight.dtype)


rms_norm_forward = dispatch(forward, reference_forward)
rms_norm_backward = dispatch(backward, reference_backward)
