"""SwiGLU activation: h = silu(gate) * up, with gate_up [rows, 2*I] (columns [:I] = gate, [I:] = up).

Numerics: fp32 math (sigmoid(g) = 1 / (1 + exp(-g)) with the accurate expf); bf16 or fp32 in and out, rounded once.
Backward: with s = sigmoid(g): d_gate = dh * up * s * (1 + g * (1 - s)), d_up = dh * g * s, written to a new
d_gate_up [rows, 2*I] laid out like gate_up.
Shapes: any number of rows, any I (odd included). Elementwise and bandwidth-bound: values travel as 8-byte words
(4 bf16 or 2 fp32, _packed.py) when I is a multiple of 4 (bf16) / 2 (fp32) and the tensors are 8-byte aligned, else
one value per load. Each thread loads all its words of a row (WORDS[P] of gate, of up, and of dh) before it computes,
so several independent loads are in flight; a warp's loads are coalesced. grid = (column blocks covering a row, row
blocks looping over the rows). launch_bounds hold the forward to 32 registers (2048 threads an SM) and the backward,
with 3 inputs, to 40 (1536 threads; at 32 it spilled): each keeps 48-64 KB of loads in flight per SM.
"""

from __future__ import annotations

import math

import torch
from numba import cuda, float32, types

from .._packed import as_words, kernels_per_codec, per_word
from .._runtime import ceil_div, dispatch, round_up, sm_count

WORDS = {1: 4, 2: 2, 4: 2}  # words per thread and tensor: 8-16 bytes in flight from each input
MAX_THREADS = 256
MIN_BLOCKS_PER_SM = {"forward": 8, "backward": 6}  # 8 x 256 threads: a full H100 SM
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y; blocks loop over the rows beyond


def _threads_for(n_words: int, p: int) -> int:
    return min(MAX_THREADS, max(32, round_up(ceil_div(n_words, WORDS[p]), 32)))


# ---------------------------------------------------------------------------------------------------- kernels
def _make_forward(codec):
    P = codec.per_word
    W = WORDS[P]
    unpack, pack = codec.unpack, codec.pack
    word = getattr(types, codec.word)

    def swiglu_fwd(gate_up, h):
        """gate_up [rows, 2n] and h [rows, n] in words of P values."""
        n = h.shape[1]
        stride = cuda.blockDim.x
        first = cuda.blockIdx.x * stride * W + cuda.threadIdx.x
        gw = cuda.local.array(W, word)
        uw = cuda.local.array(W, word)
        vals = cuda.local.array(P, float32)
        row = cuda.blockIdx.y
        while row < h.shape[0]:  # a while loop: `range` with a runtime step costs a 64-bit division and registers
            for k in range(W):
                i = first + k * stride
                if i < n:
                    gw[k] = gate_up[row, i]
                    uw[k] = gate_up[row, n + i]
            for k in range(W):
                i = first + k * stride
                if i < n:
                    for j in range(P):
                        g = unpack(gw[k], j)
                        vals[j] = g / (float32(1.0) + math.exp(-g)) * unpack(uw[k], j)
                    h[row, i] = pack(vals, 0)
            row += cuda.gridDim.y

    return swiglu_fwd


def _make_backward(codec):
    P = codec.per_word
    W = WORDS[P]
    unpack, pack = codec.unpack, codec.pack
    word = getattr(types, codec.word)

    def swiglu_bwd(dh, gate_up, d_gate_up):
        n = dh.shape[1]
        stride = cuda.blockDim.x
        first = cuda.blockIdx.x * stride * W + cuda.threadIdx.x
        dw = cuda.local.array(W, word)
        gw = cuda.local.array(W, word)
        uw = cuda.local.array(W, word)
        d_gate = cuda.local.array(P, float32)
        d_up = cuda.local.array(P, float32)
        row = cuda.blockIdx.y
        while row < dh.shape[0]:
            for k in range(W):
                i = first + k * stride
                if i < n:
                    dw[k] = dh[row, i]
                    gw[k] = gate_up[row, i]
                    uw[k] = gate_up[row, n + i]
            for k in range(W):
                i = first + k * stride
                if i < n:
                    for j in range(P):
                        g = unpack(gw[k], j)
                        d = unpack(dw[k], j)
                        s = float32(1.0) / (float32(1.0) + math.exp(-g))
                        d_gate[j] = d * unpack(uw[k], j) * s * (float32(1.0) + g * (float32(1.0) - s))
                        d_up[j] = d * g * s
                    d_gate_up[row, i] = pack(d_gate, 0)
                    d_gate_up[row, n + i] = pack(d_up, 0)
            row += cuda.gridDim.y

    return swiglu_bwd


_forward = kernels_per_codec(
    _make_forward,
    "void({w}[:, ::1], {w}[:, ::1])",
    "swiglu_fwd",
    launch_bounds=(MAX_THREADS, MIN_BLOCKS_PER_SM["forward"]),
)
_backward = kernels_per_codec(
    _make_backward,
    "void({w}[:, ::1], {w}[:, ::1], {w}[:, ::1])",
    "swiglu_bwd",
    launch_bounds=(MAX_THREADS, MIN_BLOCKS_PER_SM["backward"]),
)


# ---------------------------------------------------------------------------------------------------- launchers
def _check(gate_up: torch.Tensor):
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must be [..., 2 * intermediate_size] (gate columns then up columns), got {tuple(gate_up.shape)}"
        )


def _word_size(n: int, *tensors: torch.Tensor) -> int:
    """Values per word for all of `tensors` (rows of n values each half): the wide path only if all allow it."""
    return min(per_word(t, n) for t in tensors)


def _launch(kernels, n: int, rows: int, tensors: tuple[torch.Tensor, ...]):
    p = _word_size(n, *tensors)
    threads = _threads_for(n // p, p)
    col_blocks = ceil_div(n // p, threads * WORDS[p])
    # About 32 blocks of MAX_THREADS per SM are enough to keep the memory system busy; rows beyond loop.
    row_blocks = max(1, min(rows, MAX_GRID_Y, ceil_div(32 * sm_count(tensors[0].device), col_blocks)))
    kernels[tensors[0].dtype, p].launch((col_blocks, row_blocks), threads, tuple(as_words(t, p) for t in tensors))


def forward(gate_up: torch.Tensor) -> torch.Tensor:
    """Numba kernel. gate_up [..., 2I] -> h [..., I]."""
    _check(gate_up)
    n = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n).contiguous()
    h = torch.empty(gu.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    if h.numel():
        _launch(_forward, n, gu.shape[0], (gu, h))
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
        _launch(_backward, n, gu.shape[0], (dh2, gu, d_gu))
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
