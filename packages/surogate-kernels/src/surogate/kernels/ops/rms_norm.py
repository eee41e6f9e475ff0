"""RMSNorm: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), over the last dimension.

Numerics: fp32 accumulation; bf16 or fp32 in and out, rounded once; rstd saved in fp32 for the backward.
Backward: dx = rstd * (w*dy - x * rstd^2 * mean(w*dy*x)), formed in fp32 and rounded once; dw = sum over rows of
dy * x * rstd, reduced deterministically (fp32 partial sums per thread over its rows, added across the block's row
slots in a fixed order, one partial row per block, then `column_sum`), no atomics.
Shapes: any number of rows, hidden size up to 8192 (VALUES_PER_THREAD * 1024), odd sizes included.

The kernels here are shared with ops/fused_add_rms_norm.py: `make_forward(codec, add_residual)` is that op's
forward (h = residual + x rounded once, written, and normalized) and rms_norm's without the add;
`make_backward(codec, add_dh)` is its backward (+ dh) and rms_norm's without it. `launch_forward` and
`launch_backward` pick the codec and the grid for both.

Layout and why (H100, bf16, 4096 rows). The first version here (one block per row forward, one block per row
at a time backward, 2-byte loads) reached 33-37% of the copy bandwidth forward and 21-28% backward
(benchmarks/kernels.csv, 2026-11-27); fused_add_rms_norm's first kernels, with 8-byte words, 71-81% and 51-62%.
- Values travel as 8-byte words (4 bf16 or 2 fp32, _packed.py) when the hidden size is a multiple of 4 / 2 and
  every tensor is 8-byte aligned (else one value per load): 2-byte loads were the forward's limit.
- Each thread keeps its VALUES_PER_THREAD values of a row in registers: every input is read once and every output
  written once, and all loads of a row are issued before the first value is used.
- Forward: one block of T = hidden / 8 threads (a multiple of 32) per row, no loop; w is loaded with x, before the
  reduction (loaded after it, its latency came on top of the reduction's). 31-32 registers (bf16 words): 2048
  threads an SM.
- Backward: 2-D blocks of T x S threads (S = BACKWARD_THREADS // T row slots: 4 rows side by side at hidden 1024,
  2 at 2048, 1 from 2560), the slots reduce their rows' w*dy*x with `row_sum`, and blocks loop over rows with a
  `while` (a `range` with a runtime step costs a 64-bit division and registers). The grid is as many blocks as are
  surely resident at once (2 of 512 threads an SM: the 64-register cap of launch_bounds 1024 fits 1024 threads),
  so there is no second wave, and each thread's dweight sums stay in registers across all its rows: 264 partial
  rows on 132 SMs whatever the row count (2.2 MB written and read again at hidden 1024, 8.6 MB at 4096: 9% of the
  traffic). fused_add_rms_norm's first backward sized its grid for 2048 threads an SM that its 46-58 registers did
  not fit (two waves) and wrote 2112 partial rows at hidden 1024 (17 MB with the column reduction's reads, 50% of
  the op's traffic).
- Backward indexing, from the SASS (nvdisasm of ptxas -arch=sm_90): with a load per `if i < n` branch, the
  compiler sank each word's loads into its branch next to their use, so a row cost one memory latency per word
  plus the rstd load. Here the indices are clamped into the row (lanes past the end and idle slots load real
  words, then masked by selects), so the loads sit in one branch-free group; the four [rows, n] tensors are passed
  flat, so one 64-bit index serves them all; indices are unsigned (signed ones carry numba's negative-index
  wrap-around, more 64-bit registers). x stays as words across the reduction (fewer registers than fp32 values);
  w's words stay in registers across rows for bf16 (fp32 reloads them each row, L1 hits: keeping them spilled).
  ptxas: 53-64 registers, no spills (tools/bench/ptxas_report.py rms_norm).
Expected on the H100 (estimates, to be confirmed with tools/bench/bench_kernels.py --ops rms_norm): forward ~75-80%
of the copy bandwidth like fused_add_rms_norm's (about 8-10 us at hidden 1024, 28-31 us at 4096; Liger: 60 us at
4096; was 17 and 64 us); backward kernel ~75% of the copy bandwidth over its traffic, plus the column reduction
(~2-3 us): about 13-16 us at hidden 1024 and 47-52 us at 4096 (55-70% by the benchmark's byte count; was 40 and
119 us).
"""

from __future__ import annotations

import math

import torch
from numba import cuda, float32, types, uint64

from .._packed import as_words, kernels_per_codec, per_word
from .._runtime import (
    REDUCE_SLOTS,
    SIMULATOR,
    block_sum,
    ceil_div,
    dispatch,
    kernels_per_dtype,
    round_up,
    row_sum,
    sm_count,
)

VALUES_PER_THREAD = 8  # values of a row a thread keeps in registers: 1024 threads x 8 cover a hidden size of 8192
MAX_THREADS = 1024
# Backward block size target: row slots of T threads side by side. The simulator uses small blocks (few threads a
# barrier) and one block an SM, so its tiny shapes still run several rows a slot and an idle slot in a last round.
BACKWARD_THREADS = 64 if SIMULATOR else 512
RESIDENT_THREADS = 64 if SIMULATOR else 1024  # threads an SM surely holds: 65536 registers / the 64-register cap


def row_threads(n_cols: int, op: str = "rms_norm") -> int:
    """Threads that take one row: a multiple of 32 with VALUES_PER_THREAD values each."""
    if n_cols > VALUES_PER_THREAD * MAX_THREADS:
        raise ValueError(f"{op} supports a hidden size up to {VALUES_PER_THREAD * MAX_THREADS}, got {n_cols}")
    return min(MAX_THREADS, max(32, round_up(ceil_div(n_cols, VALUES_PER_THREAD), 32)))


# ---------------------------------------------------------------------------------------------------- kernels
def make_forward(codec, add_residual: bool):
    """The forward for one codec. With `add_residual`, x is first replaced by h = residual + x (formed in fp32,
    rounded once, written to `h`); without it, `residual` and `h` are placeholders, never read or written."""
    P = codec.per_word
    W = VALUES_PER_THREAD // P
    unpack, pack = codec.unpack, codec.pack
    word = getattr(types, codec.word)

    def rms_norm_fwd(residual, x, w, y, h, rstd, eps):
        """residual, x, y, h: [rows, n] words of P values; w: [n] words. One block per row."""
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        n = x.shape[1]
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        xw = cuda.local.array(W, word)
        rw = cuda.local.array(W, word)
        ww = cuda.local.array(W, word)
        vals = cuda.local.array(VALUES_PER_THREAD, float32)
        for k in range(W):  # every load first (w too: its latency is not paid again after the reduction)
            i = tid + k * stride
            if i < n:
                xw[k] = x[row, i]
                ww[k] = w[i]
                if add_residual:
                    rw[k] = residual[row, i]
        sum_sq = float32(0.0)
        for k in range(W):
            i = tid + k * stride
            if i < n:
                if add_residual:
                    for j in range(P):
                        vals[k * P + j] = unpack(rw[k], j) + unpack(xw[k], j)
                    xw[k] = pack(vals, k * P)  # h rounded once: the norm is of the rounded values
                    h[row, i] = xw[k]
                for j in range(P):
                    v = unpack(xw[k], j)
                    vals[k * P + j] = v
                    sum_sq += v * v
        total = block_sum(sum_sq, scratch)
        r = float32(1.0) / math.sqrt(total / float32(n * P) + eps)
        if tid == 0:
            rstd[row] = r
        for k in range(W):
            i = tid + k * stride
            if i < n:
                for j in range(P):
                    vals[k * P + j] = vals[k * P + j] * r * unpack(ww[k], j)
                y[row, i] = pack(vals, k * P)

    return rms_norm_fwd


def make_backward(codec, add_dh: bool):
    """The backward for one codec: dx = rstd * (w*dy - x * rstd^2 * mean(w*dy*x)) (+ dh with `add_dh`; without it
    `dh` is a placeholder, never read) and this block's partial row of dweight."""
    P = codec.per_word
    W = VALUES_PER_THREAD // P
    unpack, pack = codec.unpack, codec.pack
    word = getattr(types, codec.word)
    HOIST_W = W <= 2  # w's words stay in registers across rows (bf16 words); fp32 reloads them each row (L1 hits)

    def rms_norm_bwd(dy, dh, x, w, rstd, dx, dw_partial):
        """dy, dh, x, dx: [rows * n] words (flat: one index serves all four); w: [n] words; rstd: [rows];
        dw_partial: fp32 [gridDim.x, n * P]. A 2-D block: each round, the blockDim.x threads of slot threadIdx.y
        take row base + threadIdx.y, thread l of them the words l + k * blockDim.x. Indices are clamped into the
        row (and unsigned: no negative-index wrapping), so every load of a round is issued before the first value
        is used; an idle slot of the last round loads a real row and stores nothing."""
        lane = cuda.threadIdx.x
        t = cuda.blockDim.x
        slot = cuda.threadIdx.y
        slots = cuda.blockDim.y
        n = w.shape[0]
        rows = rstd.shape[0]
        scratch = cuda.shared.array((2, REDUCE_SLOTS), float32)  # alternate rounds: row_sum's contract
        sums = cuda.shared.array((VALUES_PER_THREAD, MAX_THREADS), float32)
        w_words = cuda.local.array(W, word)
        g_words = cuda.local.array(W, word)
        x_words = cuda.local.array(W, word)  # kept as words across the reduction: fewer registers than values
        dh_words = cuda.local.array(W, word)
        parts = cuda.local.array(VALUES_PER_THREAD, float32)  # r * w * dy (+ dh): dx but for the mean term
        dw_acc = cuda.local.array(VALUES_PER_THREAD, float32)
        if HOIST_W:
            for k in range(W):
                w_words[k] = w[uint64(min(lane + k * t, n - 1))]
        for k in range(VALUES_PER_THREAD):
            dw_acc[k] = float32(0.0)
        base = cuda.blockIdx.x * slots
        parity = 0
        while base < rows:  # the same rounds for every thread of the block: row_sum has a barrier
            row = base + slot
            active = row < rows
            src = min(row, rows - 1)
            r = rstd[uint64(src)]
            for k in range(W):
                col = min(lane + k * t, n - 1)
                at = uint64(src * n + col)
                g_words[k] = dy[at]
                x_words[k] = x[at]
                if add_dh:
                    dh_words[k] = dh[at]
                if not HOIST_W:
                    w_words[k] = w[uint64(col)]
            dot = float32(0.0)
            for k in range(W):
                valid = active and lane + k * t < n  # selects, not branches: the loads stay above
                for j in range(P):
                    g = unpack(g_words[k], j)
                    xv = unpack(x_words[k], j)
                    gv = g * unpack(w_words[k], j)
                    part = r * gv
                    if add_dh:
                        part += unpack(dh_words[k], j)
                    parts[k * P + j] = part
                    dw_acc[k * P + j] += g * xv * r if valid else float32(0.0)
                    dot += gv * xv if valid else float32(0.0)
            total = row_sum(dot, scratch[parity])
            if active:
                c = total * r * r * r / float32(n * P)
                for k in range(W):
                    i = lane + k * t
                    if i < n:
                        for j in range(P):
                            parts[k * P + j] -= unpack(x_words[k], j) * c
                        dx[uint64(src * n + i)] = pack(parts, k * P)
            base += cuda.gridDim.x * slots
            parity = 1 - parity
        # dweight: slot 0 adds the slots' sums of each column in slot order and writes the block's partial row
        tid = slot * t + lane
        for k in range(VALUES_PER_THREAD):
            sums[k, tid] = dw_acc[k]
        cuda.syncthreads()
        if slot == 0:
            for k in range(W):
                i = lane + k * t
                if i < n:
                    for j in range(P):
                        acc = float32(0.0)
                        for s in range(slots):
                            acc += sums[k * P + j, s * t + lane]
                        dw_partial[cuda.blockIdx.x, i * P + j] = acc

    return rms_norm_bwd


FORWARD_SIGNATURE = "void({w}[:, ::1], {w}[:, ::1], {w}[::1], {w}[:, ::1], {w}[:, ::1], float32[::1], float32)"
BACKWARD_SIGNATURE = "void({w}[::1], {w}[::1], {w}[::1], {w}[::1], float32[::1], {w}[::1], float32[:, ::1])"
_forward = kernels_per_codec(
    lambda codec: make_forward(codec, add_residual=False), FORWARD_SIGNATURE, "rms_norm_fwd", launch_bounds=1024
)
_backward = kernels_per_codec(
    lambda codec: make_backward(codec, add_dh=False), BACKWARD_SIGNATURE, "rms_norm_bwd", launch_bounds=1024
)


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


_column_sum = kernels_per_dtype(_make_column_sum, "void(float32[:, ::1], {t}[::1])", "column_sum")


# ---------------------------------------------------------------------------------------------------- launchers
def _check(name: str, t: torch.Tensor, like: torch.Tensor):
    if t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(f"{name} must be {tuple(like.shape)} of {like.dtype}, got {tuple(t.shape)} of {t.dtype}")


def _check_weight(weight: torch.Tensor, x: torch.Tensor):
    if weight.dtype != x.dtype or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}] of {x.dtype}, got {tuple(weight.shape)} of {weight.dtype}")


def launch_forward(kernels, residual, x, weight, y, h, rstd, eps: float, op: str = "rms_norm"):
    """Launch a `make_forward` kernel dict on contiguous [rows, C] tensors (residual and h: placeholders without
    the add), 8-byte words when every tensor allows."""
    rows, n_cols = x.shape
    threads = row_threads(n_cols, op)
    if rows:
        tensors = (residual, x, weight, y, h)
        p = min(per_word(t, n_cols) for t in tensors)
        args = tuple(as_words(t, p) for t in tensors) + (rstd, eps)
        kernels[x.dtype, p].launch(rows, threads, args)


def launch_backward(kernels, dy, dh, x, weight, rstd, dx, dweight, op: str = "rms_norm"):
    """Launch a `make_backward` kernel dict on contiguous [rows, C] tensors (dh: a placeholder without it), then
    reduce the blocks' partial rows into dweight."""
    rows, n_cols = x.shape
    t = row_threads(n_cols, op)
    rstd = rstd.reshape(-1)
    if rstd.dtype != torch.float32 or rstd.shape != (rows,):
        raise ValueError(f"rstd must be the forward's fp32 [{rows}], got {tuple(rstd.shape)} of {rstd.dtype}")
    if not rows:
        dweight.zero_()
        return
    slots = max(1, min(BACKWARD_THREADS // t, rows))
    block = slots * t
    blocks = min(ceil_div(rows, slots), sm_count(x.device) * max(1, RESIDENT_THREADS // block))
    partial = torch.empty(blocks, n_cols, dtype=torch.float32, device=x.device)
    tensors = (dy, dh, x, weight, dx)
    p = min(per_word(u, n_cols) for u in tensors)
    dy_w, dh_w, x_w, weight_w, dx_w = (as_words(u, p).view(-1) for u in tensors)
    kernels[x.dtype, p].launch(blocks, (t, slots), (dy_w, dh_w, x_w, weight_w, rstd, dx_w, partial))
    column_sum(partial, dweight)


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Numba kernel. x [..., C] -> (y like x, rstd fp32 [rows])."""
    _check_weight(weight, x)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    # residual and h are placeholders, never touched; inputs stand in (the simulator copies every array argument
    # back after a launch: an alias of y would overwrite it)
    launch_forward(_forward, x2, x2, weight, y, x2, rstd, eps)
    return y.view(x.shape), rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Numba kernel. Returns (dx like x, dweight like weight)."""
    _check("dy", dy, x)
    _check_weight(weight, x)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    dx = torch.empty_like(x2)
    dweight = torch.empty_like(weight)
    launch_backward(_backward, dy2, dy2, x2, weight, rstd, dx, dweight)
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
