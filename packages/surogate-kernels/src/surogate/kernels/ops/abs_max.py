"""abs-max of a tensor (any shape, fp32 or bf16) into a 0-d fp32 device tensor, for FP8 scaling.

Exact (a max involves no rounding). |x| is taken on the bits (sign cleared) and compared as integers: for
non-negative floats integer order is float order, and NaN bits (above 0x7F800000) beat inf, so a NaN anywhere gives
NaN, as torch.amax does. A grid-stride loop (blocks sized to the SM count) reads 8-byte words (_packed.py), STEP
words per thread in flight, each thread keeps an integer max; the block combines with a shared-memory atomic max,
then one global atomic max per block into a zero-initialised int32: integer max is order-independent, so the
result is deterministic. That int32 is returned viewed as the fp32 result. No host sync. Empty tensors give 0.
"""

from __future__ import annotations

import torch
from numba import cuda, int32, int64

from .._packed import as_words, f32_to_bits, kernels_per_codec, per_word
from .._runtime import ceil_div, dispatch, element_type, round_up, sm_count

STEP = 4  # words each thread loads per iteration
THREADS = 256
BLOCKS_PER_SM = 4


# ---------------------------------------------------------------------------------------------------- kernels
def _make_abs_max(codec):
    P = codec.per_word
    unpack = codec.unpack

    def abs_max_kernel(x, out):
        """x: flat words; out: int32 [1], zero on entry, receives max(|x|) as fp32 bits."""
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n = x.shape[0]
        block_best = cuda.shared.array(1, int32)
        if tid == 0:
            block_best[0] = 0
        cuda.syncthreads()
        key = int64(0)
        for base in range(cuda.blockIdx.x * nt * STEP + tid, n, cuda.gridDim.x * nt * STEP):
            for k in range(STEP):
                i = base + k * nt
                if i < n:
                    w = x[i]
                    for p in range(P):
                        key = max(key, f32_to_bits(unpack(w, p)) & 0x7FFFFFFF)
        cuda.atomic.max(block_best, 0, int32(key))
        cuda.syncthreads()
        if tid == 0:
            cuda.atomic.max(out, 0, block_best[0])

    return abs_max_kernel


_abs_max = kernels_per_codec(_make_abs_max, "void({w}[::1], int32[::1])", "abs_max")


# ---------------------------------------------------------------------------------------------------- launchers
def forward(x: torch.Tensor) -> torch.Tensor:
    """Numba kernel. max(|x|) as a 0-d fp32 tensor on x's device."""
    element_type(x.dtype)
    flat = x.reshape(-1).contiguous()
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    if flat.numel():
        p = per_word(flat, flat.numel())
        words = as_words(flat, p)
        threads = min(THREADS, max(32, round_up(ceil_div(words.shape[0], STEP), 32)))
        blocks = max(1, min(ceil_div(words.shape[0], threads * STEP), BLOCKS_PER_SM * sm_count(x.device)))
        _abs_max[x.dtype, p].launch(blocks, threads, (words, out))
    return out.view(torch.float32).reshape(())


# ---------------------------------------------------------------------------------------------------- reference
def reference(x: torch.Tensor) -> torch.Tensor:
    """Plain torch: the oracle for tests and the CPU path."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.abs().amax().to(torch.float32)


abs_max = dispatch(forward, reference)
