"""Bias gradient: column sums of dy [rows, N] (Qwen2's q/k/v bias), accumulated in fp32, output in dy's dtype.

Two deterministic stages, no atomics. Stage 1: a block owns a column tile (threads across columns, each thread P
adjacent columns read as one 8-byte word: coalesced, _packed.py) and a range of rows; each thread loads STEP rows
before adding them (STEP x 8 bytes in flight) and sums in row order in fp32; it writes fp32 partials
[row_blocks, N]. Stage 2: one thread per column sums its row_blocks partials in order and rounds once.
row_blocks is chosen so stage 1 runs ~2 blocks per SM (a few dozen partial rows: stage 2 stays a few us).
"""

from __future__ import annotations

import torch
from numba import cuda, float32

from .._packed import as_words, kernels_per_codec, per_word
from .._runtime import ceil_div, dispatch, element_type, kernels_per_dtype, round_up, sm_count

STEP = 8  # rows each thread loads before adding them
THREADS = 256
BLOCKS_PER_SM = 2


# ---------------------------------------------------------------------------------------------------- kernels
def _make_partial(codec):
    P = codec.per_word
    unpack = codec.unpack
    VALS = STEP * P

    def bias_grad_partial(dy, partial):
        """dy [rows, N / P] words -> partial[blockIdx.y, columns] fp32 sums over this block's rows."""
        word = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        rows = dy.shape[0]
        per_block = (rows + cuda.gridDim.y - 1) // cuda.gridDim.y
        first = cuda.blockIdx.y * per_block
        last = min(rows, first + per_block)
        vals = cuda.local.array(VALS, float32)
        acc = cuda.local.array(P, float32)
        for p in range(P):
            acc[p] = float32(0.0)
        if word < dy.shape[1]:
            for base in range(first, last, STEP):
                for k in range(STEP):
                    r = base + k
                    if r < last:
                        w = dy[r, word]
                        for p in range(P):
                            vals[k * P + p] = unpack(w, p)
                    else:
                        for p in range(P):
                            vals[k * P + p] = float32(0.0)
                for k in range(STEP):
                    for p in range(P):
                        acc[p] += vals[k * P + p]
            for p in range(P):
                partial[cuda.blockIdx.y, word * P + p] = acc[p]

    return bias_grad_partial


def _make_columns(load, store):
    def bias_grad_columns(partial, out):
        """out[j] = sum over i of partial[i, j], in order, STEP partial rows loaded at a time."""
        j = cuda.grid(1)
        n = partial.shape[0]
        vals = cuda.local.array(STEP, float32)
        if j < partial.shape[1]:
            acc = float32(0.0)
            for base in range(0, n, STEP):
                for k in range(STEP):
                    vals[k] = partial[base + k, j] if base + k < n else float32(0.0)
                for k in range(STEP):
                    acc += vals[k]
            out[j] = store(acc)

    return bias_grad_columns


_partial = kernels_per_codec(_make_partial, "void({w}[:, ::1], float32[:, ::1])", "bias_grad_partial")
_columns = kernels_per_dtype(_make_columns, "void(float32[:, ::1], {t}[::1])", "bias_grad_columns")


# ---------------------------------------------------------------------------------------------------- launchers
def forward(dy: torch.Tensor) -> torch.Tensor:
    """Numba kernels. dy [..., N] -> [N] column sums in dy.dtype."""
    element_type(dy.dtype)
    n_cols = dy.shape[-1]
    dy2 = dy.reshape(-1, n_cols).contiguous()
    out = torch.empty(n_cols, dtype=dy.dtype, device=dy.device)
    rows = dy2.shape[0]
    if rows == 0 or n_cols == 0:
        return out.zero_()
    p = per_word(dy2, n_cols)
    words = as_words(dy2, p)
    threads = min(THREADS, round_up(words.shape[1], 32))
    col_blocks = ceil_div(words.shape[1], threads)
    row_blocks = max(1, min(ceil_div(rows, STEP), ceil_div(BLOCKS_PER_SM * sm_count(dy.device), col_blocks)))
    partial = torch.empty(row_blocks, n_cols, dtype=torch.float32, device=dy.device)
    _partial[dy.dtype, p].launch((col_blocks, row_blocks), threads, (words, partial))
    _columns[dy.dtype].launch(ceil_div(n_cols, THREADS), min(THREADS, round_up(n_cols, 32)), (partial, out))
    return out


# ---------------------------------------------------------------------------------------------------- reference
def reference(dy: torch.Tensor) -> torch.Tensor:
    """Plain torch: the oracle for tests and the CPU path."""
    compute = torch.promote_types(dy.dtype, torch.float32)
    return dy.reshape(-1, dy.shape[-1]).to(compute).sum(0).to(dy.dtype)


bias_grad = dispatch(forward, reference)
