"""SwiGLU activation: h = silu(gate) * up, with gate_up [rows, 2*I] (columns [:I] = gate, [I:] = up).

Numerics: fp32 math (sigmoid(g) = 1 / (1 + exp(-g)) with the accurate expf); bf16 or fp32 in and out, rounded once.
Backward: with s = sigmoid(g): d_gate = dh * up * s * (1 + g * (1 - s)), d_up = dh * g * s, written to a new
d_gate_up [rows, 2*I] laid out like gate_up.
Shapes: any number of rows, any I (odd included). Elementwise and bandwidth-bound: each thread loads
ELEMENTS_PER_THREAD columns of a row before it computes (independent loads in flight), a warp's loads are coalesced;
grid = (column blocks covering a row, row blocks looping over the rows). launch_bounds (256, 8) holds the kernels to
32 registers, so 2048 threads fit on an SM (full occupancy keeps enough loads in flight for HBM).
"""

from __future__ import annotations

import math

import torch
from numba import cuda, float32

from .._runtime import ceil_div, dispatch, kernels_per_dtype, round_up, sm_count

ELEMENTS_PER_THREAD = 4
MAX_THREADS = 256
MIN_BLOCKS_PER_SM = 8  # 8 x 256 threads: a full H100 SM
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y; blocks loop over the rows beyond


def _threads_for(n_cols: int) -> int:
    return min(MAX_THREADS, max(32, round_up(ceil_div(n_cols, ELEMENTS_PER_THREAD), 32)))


# ---------------------------------------------------------------------------------------------------- kernels
def _make_forward(load, store):
    def swiglu_fwd(gate_up, h):
        n = h.shape[1]
        stride = cuda.blockDim.x
        first = cuda.blockIdx.x * stride * ELEMENTS_PER_THREAD + cuda.threadIdx.x
        gs = cuda.local.array(ELEMENTS_PER_THREAD, float32)
        us = cuda.local.array(ELEMENTS_PER_THREAD, float32)
        row = cuda.blockIdx.y
        while row < h.shape[0]:  # a while loop: `range` with a runtime step costs a 64-bit division and registers
            for k in range(ELEMENTS_PER_THREAD):
                i = first + k * stride
                g = float32(0.0)
                u = float32(0.0)
                if i < n:
                    g = load(gate_up[row, i])
                    u = load(gate_up[row, n + i])
                gs[k] = g
                us[k] = u
            for k in range(ELEMENTS_PER_THREAD):
                i = first + k * stride
                if i < n:
                    g = gs[k]
                    s = float32(1.0) / (float32(1.0) + math.exp(-g))
                    h[row, i] = store(g * s * us[k])
            row += cuda.gridDim.y

    return swiglu_fwd


def _make_backward(load, store):
    def swiglu_bwd(dh, gate_up, d_gate_up):
        n = dh.shape[1]
        stride = cuda.blockDim.x
        first = cuda.blockIdx.x * stride * ELEMENTS_PER_THREAD + cuda.threadIdx.x
        ds = cuda.local.array(ELEMENTS_PER_THREAD, float32)
        gs = cuda.local.array(ELEMENTS_PER_THREAD, float32)
        us = cuda.local.array(ELEMENTS_PER_THREAD, float32)
        row = cuda.blockIdx.y
        while row < dh.shape[0]:
            for k in range(ELEMENTS_PER_THREAD):
                i = first + k * stride
                d = float32(0.0)
                g = float32(0.0)
                u = float32(0.0)
                if i < n:
                    d = load(dh[row, i])
                    g = load(gate_up[row, i])
                    u = load(gate_up[row, n + i])
                ds[k] = d
                gs[k] = g
                us[k] = u
            for k in range(ELEMENTS_PER_THREAD):
                i = first + k * stride
                if i < n:
                    g = gs[k]
                    s = float32(1.0) / (float32(1.0) + math.exp(-g))
                    d = ds[k]
                    d_gate_up[row, i] = store(d * us[k] * s * (float32(1.0) + g * (float32(1.0) - s)))
                    d_gate_up[row, n + i] = store(d * g * s)
            row += cuda.gridDim.y

    return swiglu_bwd


_forward = kernels_per_dtype(
    _make_forward, "void({t}[:, ::1], {t}[:, ::1])", "swiglu_fwd", launch_bounds=(MAX_THREADS, MIN_BLOCKS_PER_SM)
)
_backward = kernels_per_dtype(
    _make_backward, "void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1])", "swiglu_bwd", launch_bounds=(MAX_THREADS, MIN_BLOCKS_PER_SM)
)


# ---------------------------------------------------------------------------------------------------- launchers
def _check(gate_up: torch.Tensor):
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must be [..., 2 * intermediate_size] (gate columns then up columns), got {tuple(gate_up.shape)}"
        )


def _grid(rows: int, n_cols: int, threads: int, device) -> tuple[int, int]:
    col_blocks = ceil_div(n_cols, threads * ELEMENTS_PER_THREAD)
    # About 32 blocks of MAX_THREADS per SM are enough to keep the memory system busy; rows beyond loop.
    row_blocks = max(1, min(rows, MAX_GRID_Y, ceil_div(32 * sm_count(device), col_blocks)))
    return col_blocks, row_blocks


def forward(gate_up: torch.Tensor) -> torch.Tensor:
    """Numba kernel. gate_up [..., 2I] -> h [..., I]."""
    _check(gate_up)
    n = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n).contiguous()
    h = torch.empty(gu.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    if h.numel():
        threads = _threads_for(n)
        _forward[gate_up.dtype].launch(_grid(gu.shape[0], n, threads, gate_up.device), threads, (gu, h))
    return h.view(*gate_up.shape[:-1], n)


def backward(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """Numba kernel. dh [..., I], gate_up [..., 2I] -> d_gate_up [..., 2I]."""
    _check(gate_up)
    n = gate_up.shape[-1] // 2
    if dh.shape[-1] != n or dh.dtype != gate_up.dtype or dh.numel() * 2 != gate_up.numel():
        raise ValueError(f"dh must be {tuple(gate_up.shape[:-1]) + (n,)} of {gate_up.dtype}, got "
                         f"{tuple(dh.shape)} of {dh.dtype}")
    gu = gate_up.reshape(-1, 2 * n).contiguous()
    dh2 = dh.reshape(-1, n).contiguous()
    d_gu = torch.empty_like(gu)
    if d_gu.numel():
        threads = _threads_for(n)
        _backward[gate_up.dtype].launch(_grid(gu.shape[0], n, threads, gate_up.device), threads, (dh2, gu, d_gu))
    return d_gu.view(gate_up.shape)


# ---------------------------------------------------------------------------------------------------- reference
def reference_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain torch math in fp32 (fp64 for fp64 inputs): the oracle for tests and the CPU path."""
    _check(gate_up)
    compute = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(compute).chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(gate_up.dtype)


def reference_backward(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    _check(gate_up)
    compute = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(compute).chunk(2, dim=-1)
    d = dh.to(compute)
    s = torch.sigmoid(gate)
    d_gate = d * up * s * (1 + gate * (1 - s))
    d_up = d * gate * s
    return torch.cat([d_gate, d_up], dim=-1).to(gate_up.dtype)


swiglu_forward = dispatch(forward, reference_forward)
swiglu_backward = dispatch(backward, reference_backward)
