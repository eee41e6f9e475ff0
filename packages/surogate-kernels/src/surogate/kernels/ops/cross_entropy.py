"""Cross-entropy over the vocabulary, with the gradient written IN PLACE into the logits buffer.

loss[row] = logsumexp(x[row]) - x[row, target[row]]; the gradient (softmax(x[row]) - onehot(target)) * grad_scale
overwrites the logits (bf16 or fp32), so no [rows, V] gradient, and no fp32 copy of bf16 logits, is allocated.
Rows whose target is ignore_index get loss 0 and gradient 0. A target outside [0, V) gives a NaN loss on the GPU
(raising would need a host sync); the CPU reference raises.

Numerics: one block per row, read as 8-byte words (4 bf16 or 2 fp32 values: _packed.py) when V allows.
Pass 1 reads the row once: each thread keeps a running max m and sum-exp s in fp32 (rescaled when its max grows,
once per WORDS[P] words), the block combines them (max, then rescaled sums) into lse = M + log(S).
Pass 2 reads the row again and writes exp(x - lse) * grad_scale (minus grad_scale at the target), rounded once to
the logits dtype. exp(d) is computed as exp2(d * log2 e) (ex2.approx on the GPU, ~2 ulp).
Per-row losses go to an fp32 buffer; one block then sums them and counts valid targets in a fixed order
(deterministic, no atomics); loss_sum (fp32) and n_valid (int64) are 0-d device tensors: no host sync.
grad_scale is a float or a 0-d fp32 device tensor (e.g. 1 / n_valid of the whole batch, computed on the device).
Shapes: logits [rows, V] contiguous, any V >= 1 (151936, 262144, odd sizes); targets [rows] int32 or int64.
n_valid is counted in fp32 inside the block: exact for rows < 2^24.
Memory traffic: read the row twice, write it once (the second read mostly misses L2 at V = 151936).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda, float32, int64

from .._packed import as_words, kernels_per_codec, per_word
from .._runtime import (
    REDUCE_SLOTS,
    SIMULATOR,
    Kernel,
    block_max,
    block_sum,
    ceil_div,
    device_function,
    dispatch,
    element_type,
    round_up,
)

WORDS = {1: 8, 2: 4, 4: 4}  # words each thread loads before using them: 16-32 bytes in flight per thread
MAX_THREADS = 512  # 3 blocks of 512 per SM; V = 151936 bf16 is 18.5 passes of 512 x 4 words: the ragged tail wastes ~3%
LOG2E = 1.4426950408889634

if SIMULATOR:

    @device_function
    def _exp2(x):
        return float32(np.exp2(np.float32(x)))

else:
    from numba.cuda import libdevice

    @device_function
    def _exp2(x):
        return libdevice.exp2f(x)


def _threads_for(n_words: int, per_word: int) -> int:
    return min(MAX_THREADS, max(32, round_up(ceil_div(n_words, WORDS[per_word]), 32)))


# ---------------------------------------------------------------------------------------------------- kernels
def _make_row_kernel(codec):
    P = codec.per_word
    unpack, pack = codec.unpack, codec.pack
    STEP = WORDS[P]
    VALS = STEP * P

    def cross_entropy_rows(logits, targets, ignore_index, scale, losses, with_grad):
        """logits: [rows, V / P] words. One block per row."""
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n_words = logits.shape[1]
        log2e = float32(LOG2E)
        neg_inf = float32(-math.inf)
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        vals = cuda.local.array(VALS, float32)
        target = targets[row]
        if target == ignore_index:  # the whole block takes this branch
            if tid == 0:
                losses[row] = float32(0.0)
            if with_grad:
                for k in range(VALS):
                    vals[k] = float32(0.0)
                zero = pack(vals, 0)
                for i in range(tid, n_words, nt):
                    logits[row, i] = zero
            return
        in_range = target >= 0 and target < n_words * P
        target_logit = float32(0.0)
        if tid == 0 and in_range:  # read before the barriers that precede pass 2's writes
            target_logit = unpack(logits[row, target // P], target % P)

        # pass 1: online max / sum-exp
        m = neg_inf
        s = float32(0.0)
        for base in range(0, n_words, nt * STEP):
            for k in range(STEP):
                i = base + k * nt + tid
                if i < n_words:
                    w = logits[row, i]
                    for j in range(P):
                        vals[k * P + j] = unpack(w, j)
                else:
                    for j in range(P):
                        vals[k * P + j] = neg_inf
            chunk_max = neg_inf
            for k in range(VALS):
                chunk_max = max(chunk_max, vals[k])
            if chunk_max > m:
                s *= _exp2((m - chunk_max) * log2e)
                m = chunk_max
            if chunk_max > neg_inf:  # then m is finite; -inf values (padding) add exp2(-inf) = 0
                for k in range(VALS):
                    s += _exp2((vals[k] - m) * log2e)
        row_max = block_max(m, scratch)
        part = float32(0.0)
        if m > neg_inf:
            part = s * _exp2((m - row_max) * log2e)
        lse = row_max + math.log(block_sum(part, scratch))
        if tid == 0:
            losses[row] = lse - target_logit if in_range else float32(math.nan)

        # pass 2: dlogits = (softmax - onehot) * scale, in place
        if with_grad:
            g = scale[0]
            for base in range(0, n_words, nt * STEP):
                for k in range(STEP):
                    i = base + k * nt + tid
                    if i < n_words:
                        w = logits[row, i]
                        for j in range(P):
                            vals[k * P + j] = unpack(w, j)
                for k in range(STEP):
                    i = base + k * nt + tid
                    if i < n_words:
                        for j in range(P):
                            p = _exp2((vals[k * P + j] - lse) * log2e)
                            if i * P + j == target:
                                p -= float32(1.0)
                            vals[k * P + j] = p * g
                        logits[row, i] = pack(vals, k * P)

    return cross_entropy_rows


def _sum_losses_kernel(losses, targets, ignore_index, loss_sum, n_valid):
    """One block: loss_sum = sum(losses), n_valid = count(targets != ignore_index), in a fixed order."""
    tid = cuda.threadIdx.x
    scratch = cuda.shared.array(REDUCE_SLOTS, float32)
    acc = float32(0.0)
    count = float32(0.0)
    for i in range(tid, losses.shape[0], cuda.blockDim.x):
        acc += losses[i]
        if targets[i] != ignore_index:
            count += float32(1.0)
    total = block_sum(acc, scratch)
    valid = block_sum(count, scratch)
    if tid == 0:
        loss_sum[0] = total
        n_valid[0] = int64(valid)


_rows = kernels_per_codec(
    _make_row_kernel, "void({w}[:, ::1], int64[::1], int64, float32[::1], float32[::1], int32)", "cross_entropy"
)
_sum_losses = Kernel(
    _sum_losses_kernel, "void(float32[::1], int64[::1], int64, float32[::1], int64[::1])", "cross_entropy_sum"
)


# ---------------------------------------------------------------------------------------------------- launchers
def _check(logits: torch.Tensor, targets: torch.Tensor):
    element_type(logits.dtype)
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(
            f"logits must be a contiguous [rows, vocab] tensor (the gradient is written in place), "
            f"got shape {tuple(logits.shape)} contiguous={logits.is_contiguous()}: reshape or .contiguous() first"
        )
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must be [{logits.shape[0]}] (one per logits row), got {tuple(targets.shape)}")


def scale_arg(value, device: torch.device) -> torch.Tensor:
    """A float or a 0-d / 1-element tensor as the fp32 [1] device tensor kernels read (no host sync)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def row_losses(logits, targets, ignore_index: int, grad_scale, losses: torch.Tensor, with_grad: bool):
    """Numba kernel: per-row losses into `losses` [rows] fp32; with_grad overwrites logits with dlogits."""
    _check(logits, targets)
    if logits.shape[0] == 0:
        return
    p = per_word(logits, logits.shape[1])
    words = as_words(logits, p)
    _rows[logits.dtype, p].launch(
        logits.shape[0],
        _threads_for(words.shape[1], p),
        (words, targets.to(torch.int64).contiguous(), int(ignore_index), scale_arg(grad_scale, logits.device), losses,
         int(with_grad)),
    )


def sum_losses(losses: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Numba kernel: (loss_sum fp32 0-d, n_valid int64 0-d) from per-row losses, deterministic."""
    loss_sum = torch.empty(1, dtype=torch.float32, device=losses.device)
    n_valid = torch.empty(1, dtype=torch.int64, device=losses.device)
    threads = min(1024, max(32, round_up(losses.shape[0], 32)))
    _sum_losses.launch(1, threads, (losses, targets.to(torch.int64).contiguous(), int(ignore_index), loss_sum, n_valid))
    return loss_sum.reshape(()), n_valid.reshape(())


def forward_backward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, grad_scale=1.0):
    """Numba kernels. Overwrites logits with dlogits * grad_scale; returns (loss_sum, n_valid) 0-d device tensors."""
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    row_losses(logits, targets, ignore_index, grad_scale, losses, with_grad=True)
    return sum_losses(losses, targets, ignore_index)


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Numba kernels. (loss_sum, n_valid) without gradients; logits are left unchanged."""
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    row_losses(logits, targets, ignore_index, 1.0, losses, with_grad=False)
    return sum_losses(losses, targets, ignore_index)


# ---------------------------------------------------------------------------------------------------- reference
def reference_row_losses(logits, targets, ignore_index: int, grad_scale, losses: torch.Tensor, with_grad: bool):
    """Plain torch math with `row_losses`' contract: per-row losses into `losses`; with_grad overwrites logits."""
    _check(logits, targets)
    compute = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(compute)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(x, dim=-1)
    losses.copy_(torch.where(valid, lse - x.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse)))
    if with_grad:
        grad = torch.exp(x - lse[:, None])
        grad[torch.arange(x.shape[0], device=x.device), safe] -= 1.0
        scale = grad_scale.to(x) if isinstance(grad_scale, torch.Tensor) else grad_scale
        grad *= valid[:, None].to(compute) * scale
        logits.copy_(grad)


def reference_sum_losses(losses: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    return losses.sum(), (targets != ignore_index).sum()


def reference_forward_backward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, grad_scale=1.0):
    """Plain torch math in fp32 (fp64 for fp64 logits): the oracle for tests and the CPU path.
    Overwrites logits with dlogits * grad_scale; returns (loss_sum, n_valid)."""
    losses = torch.empty(logits.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    reference_row_losses(logits, targets, ignore_index, grad_scale, losses, with_grad=True)
    return reference_sum_losses(losses, targets, ignore_index)


def reference_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Plain torch math: (loss_sum, n_valid); logits are left unchanged."""
    losses = torch.empty(logits.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    reference_row_losses(logits, targets, ignore_index, 1.0, losses, with_grad=False)
    return reference_sum_losses(losses, targets, ignore_index)


cross_entropy_forward_backward = dispatch(forward_backward, reference_forward_backward)
cross_entropy_loss = dispatch(forward, reference_forward)
