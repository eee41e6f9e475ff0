"""NVFP4: E2M1 values in blocks of 16 with E4M3 block scales and an FP32 global scale (TransformerEngine's
NVFP4BlockScaling), plus the 16-point random Hadamard transform used on the wgrad GEMM inputs.

Format of an [R, C] tensor (leading dims flattened into rows; C a multiple of 16):
- E2M1 magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}: code = sign << 3 | exponent(2) << 1 | mantissa(1); two codes a byte,
  element 2i in the LOW nibble (torch.float4_e2m1fn_x2 / cuBLAS order): codes uint8 [R, C / 2].
- global scale S = 448 * 6 / amax(x) (fp32; 1 when amax is 0 or not finite; clamped to the largest fp32).
- block scale = E4M3(block_amax / 6 * S) (round to nearest even, saturating); 1-D blocks are 16 consecutive
  values of a row (activations, gradients): scales [R, C / 16]; 2-D blocks are 16x16 tiles (weights, so W and W^T
  quantise identically): scales [ceil(R / 16), C / 16].
- element code = E2M1(x * (S / block_scale)) (0 when the block scale is 0), saturating at +-6; E2M1 has no NaN or
  inf, so NaN becomes +-6. Rounding: to nearest, ties to even code; or stochastic (gradients): the lower neighbour
  `lo`, raised to the upper `hi` when u < (|v| - lo) / (hi - lo) (exact in fp32), u = 24 random bits / 2^24 from a
  counter-based hash of (element index, seed): deterministic per seed, unbiased in expectation.
- dequantise: value(code) * block_scale / S (fp32; the product is exact, one rounding in the division), then the
  output dtype. `include_global=False` leaves out "/ S" (exact in bf16): the GEMM then multiplies its fp32 result by
  alpha = 1 / (S_a * S_b), as the FP4 tensor-core GEMMs do.
Hadamard: y = (H16 / 4) diag(s) x on each group of 16 rows (H16 Sylvester's, entries +-1; s = 16 random signs from
the seed): orthonormal, so y^T y' = x^T x' for two tensors with the same seed and `inverse` undoes it exactly in
real arithmetic. Applied along the token dim (rows) of both wgrad operands, it spreads outliers before quantising.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda, float32, int32, int64

from surogate.kernels._runtime import ELEMENT_TYPES, Kernel, ceil_div, device_function, sm_count

from . import fp8
from ._device import (
    bits_f32,
    counter_random,
    counter_random_torch,
    div_rn,
    f32_bits,
    hash32,
    hash32_int,
    minifloat_rne,
    minifloat_rz,
    minifloat_value,
)

BLOCK = 16
E2M1_MAX = 6.0
E2M1_MAX_BITS = 0x40C00000  # fp32 bits of 6.0
E2M1_MBITS, E2M1_EMIN = 1, 0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
GLOBAL_NUMERATOR = 448.0 * 6.0
U24 = float(2.0**-24)
THREADS = 128
_e4m3_encode, _e4m3_decode = fp8.make_codec(fp8.FORMATS["e4m3"])


@dataclass
class NVFP4Tensor:
    codes: torch.Tensor  # uint8 [R, C / 2]
    block_scales: torch.Tensor  # uint8 E4M3 codes: [R, C / 16] (1-D) or [ceil(R / 16), C / 16] (2-D)
    global_scale: torch.Tensor  # fp32 [1]: S = 2688 / amax
    shape: torch.Size
    dtype: torch.dtype
    block_2d: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.block_scales, self.global_scale))

    def to(self, device) -> NVFP4Tensor:
        moved = (self.codes.to(device), self.block_scales.to(device), self.global_scale.to(device))
        return NVFP4Tensor(*moved, self.shape, self.dtype, self.block_2d)


# ---------------------------------------------------------------------------------------------------- kernels
@device_function
def _e2m1_code(v, stochastic, index, seed_hash):
    """4-bit code of v (already multiplied by the block's encode scale)."""
    bits = f32_bits(v)
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    if a > E2M1_MAX_BITS:  # saturate (NaN too: E2M1 has none)
        a = E2M1_MAX_BITS
    if stochastic == 0:
        c = minifloat_rne(a, E2M1_MBITS, E2M1_EMIN)
    else:
        c = minifloat_rz(a, E2M1_MBITS, E2M1_EMIN)
        mag = bits_f32(a)
        lo = minifloat_value(c, E2M1_MBITS, E2M1_EMIN)
        if lo < mag:
            hi = minifloat_value(c + 1, E2M1_MBITS, E2M1_EMIN)
            frac = div_rn(mag - lo, hi - lo)
            u = float32(counter_random(index, seed_hash) >> 8) * float32(U24)
            if u < frac:
                c += 1
    return c | (sign << 3)


@device_function
def _block_encode_scale(amax, s_global):
    """(E4M3 code of the block scale, the fp32 factor that maps the block's values onto the E2M1 grid)."""
    code = _e4m3_encode(div_rn(amax, float32(6.0)) * s_global, float32(1.0))
    scale = _e4m3_decode(code)
    enc = float32(0.0)
    if scale > float32(0.0):
        enc = div_rn(s_global, scale)
    return code, enc


def _make_quantize_1d(load):
    def nvfp4_quantize_1d(x, codes, scales, s_global_arr, seed_arr, stochastic):
        """One thread per block of 16 values of a row."""
        t = cuda.grid(1)
        n_blocks = x.shape[1] // BLOCK
        if t >= x.shape[0] * n_blocks:
            return
        row = t // n_blocks
        col0 = (t % n_blocks) * BLOCK
        s_global = s_global_arr[0]
        seed_hash = hash32(seed_arr[0])
        amax = float32(0.0)
        for k in range(BLOCK):
            a = abs(load(x[row, col0 + k]))
            if a > amax:
                amax = a
        code, enc = _block_encode_scale(amax, s_global)
        scales[row, col0 // BLOCK] = code
        base = int64(row) * x.shape[1] + col0
        for k in range(0, BLOCK, 2):
            lo = _e2m1_code(load(x[row, col0 + k]) * enc, stochastic, base + k, seed_hash)
            hi = _e2m1_code(load(x[row, col0 + k + 1]) * enc, stochastic, base + k + 1, seed_hash)
            codes[row, (col0 + k) >> 1] = lo | (hi << 4)

    return nvfp4_quantize_1d


def _make_quantize_2d(load):
    def nvfp4_quantize_2d(x, codes, scales, s_global_arr, seed_arr, stochastic):
        """One thread per 16x16 tile (the last tile row may be partial)."""
        t = cuda.grid(1)
        n_tc = x.shape[1] // BLOCK
        if t >= scales.shape[0] * n_tc:
            return
        tr = t // n_tc
        col0 = (t % n_tc) * BLOCK
        row0 = tr * BLOCK
        row1 = min(row0 + BLOCK, x.shape[0])
        s_global = s_global_arr[0]
        seed_hash = hash32(seed_arr[0])
        amax = float32(0.0)
        for r in range(row0, row1):
            for k in range(BLOCK):
                a = abs(load(x[r, col0 + k]))
                if a > amax:
                    amax = a
        code, enc = _block_encode_scale(amax, s_global)
        scales[tr, col0 // BLOCK] = code
        for r in range(row0, row1):
            base = int64(r) * x.shape[1] + col0
            for k in range(0, BLOCK, 2):
                lo = _e2m1_code(load(x[r, col0 + k]) * enc, stochastic, base + k, seed_hash)
                hi = _e2m1_code(load(x[r, col0 + k + 1]) * enc, stochastic, base + k + 1, seed_hash)
                codes[r, (col0 + k) >> 1] = lo | (hi << 4)

    return nvfp4_quantize_2d


@device_function
def _e2m1_value(c):
    v = minifloat_value(c & 7, E2M1_MBITS, E2M1_EMIN)
    return -v if (c >> 3) == 1 else v


def _make_dequantize(store):
    def nvfp4_dequantize(codes, scales, s_global_arr, out, block_rows, include_global):
        """One thread per code byte (two values). block_rows: 1 (1-D blocks) or 16 (2-D tiles)."""
        j = cuda.grid(1)
        step = cuda.gridsize(1)
        half = codes.shape[1]
        s_global = s_global_arr[0]
        while j < codes.shape[0] * half:
            row = j // half
            b = j % half
            scale = _e4m3_decode(scales[row // block_rows, (2 * b) // BLOCK])
            c = int32(codes[row, b])
            v0 = _e2m1_value(c & 15) * scale
            v1 = _e2m1_value(c >> 4) * scale
            if include_global != 0:
                v0 = div_rn(v0, s_global)
                v1 = div_rn(v1, s_global)
            out[row, 2 * b] = store(v0)
            out[row, 2 * b + 1] = store(v1)
            j += step

    return nvfp4_dequantize


def _make_hadamard(load, store):
    def hadamard16(x, signs, y, inverse):
        """One thread per (group of 16 rows, column): y = H/4 D x (or D H/4 x for the inverse)."""
        t = cuda.grid(1)
        n_cols = x.shape[1]
        if t >= (x.shape[0] // BLOCK) * n_cols:
            return
        row0 = (t // n_cols) * BLOCK
        col = t % n_cols
        v = cuda.local.array(BLOCK, float32)
        for k in range(BLOCK):
            v[k] = load(x[row0 + k, col])
            if inverse == 0:
                v[k] *= signs[k]
        h = 1
        while h < BLOCK:  # Walsh-Hadamard butterflies, natural (Sylvester) order
            for k in range(BLOCK):
                if (k & h) == 0:
                    a = v[k]
                    b = v[k + h]
                    v[k] = a + b
                    v[k + h] = a - b
            h *= 2
        for k in range(BLOCK):
            r = v[k] * float32(0.25)
            if inverse != 0:
                r *= signs[k]
            y[row0 + k, col] = store(r)

    return hadamard16


_SIG_Q = "void({t}[:, ::1], uint8[:, ::1], uint8[:, ::1], float32[::1], int64[::1], int32)"
_quantize_1d = {
    dtype: Kernel(_make_quantize_1d(load), _SIG_Q.format(t=t), f"nvfp4_quantize_1d[{t}]")
    for dtype, (t, load, store) in ELEMENT_TYPES.items()
}
_quantize_2d = {
    dtype: Kernel(_make_quantize_2d(load), _SIG_Q.format(t=t), f"nvfp4_quantize_2d[{t}]")
    for dtype, (t, load, store) in ELEMENT_TYPES.items()
}
_dequantize = {
    dtype: Kernel(
        _make_dequantize(store),
        f"void(uint8[:, ::1], uint8[:, ::1], float32[::1], {t}[:, ::1], int64, int32)",
        f"nvfp4_dequantize[{t}]",
    )
    for dtype, (t, load, store) in ELEMENT_TYPES.items()
}
_hadamard = {
    dtype: Kernel(
        _make_hadamard(load, store), f"void({t}[:, ::1], float32[::1], {t}[:, ::1], int32)", f"hadamard16[{t}]"
    )
    for dtype, (t, load, store) in ELEMENT_TYPES.items()
}


# -------------------------------------------------------------------------------------------------- helpers
def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """S = 448 * 6 / amax as fp32 [1] on amax's device (1 when amax is 0, NaN or inf; clamped to the largest fp32)."""
    amax = amax.float().reshape(1)
    s = torch.full_like(amax, GLOBAL_NUMERATOR) / amax  # one rounding (scalar / tensor would take two)
    s = torch.where((amax > 0) & torch.isfinite(amax), s, torch.ones_like(s))
    return s.clamp(max=torch.finfo(torch.float32).max)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in ELEMENT_TYPES:
        raise TypeError(f"NVFP4 quantises float32 or bfloat16 tensors, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs a last dimension that is a multiple of {BLOCK}, got shape {tuple(x.shape)}")
    return x.detach().reshape(-1, x.shape[-1]).contiguous()


def _seed_tensor(seed, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.full((1,), int(seed) & 0xFFFFFFFF, dtype=torch.int64, device=device)  # a fill, no host copy


@functools.lru_cache(maxsize=1024)
def hadamard_signs(seed: int) -> torch.Tensor:
    """The 16 +-1 signs of the random diagonal for `seed` (fp32, CPU; do not modify: cached)."""
    bits = counter_random_torch(torch.arange(BLOCK), hash32_int(int(seed) ^ 0xA5A5A5A5)) & 1
    return (1 - 2 * bits).float()


_SIGNS_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _signs_on(seed: int, device) -> torch.Tensor:
    """hadamard_signs on `device`, cached (no host-to-device copy inside a CUDA-graph capture)."""
    key = (int(seed), torch.device(device))
    if key not in _SIGNS_ON_DEVICE:
        _SIGNS_ON_DEVICE[key] = hadamard_signs(seed).to(device)
    return _SIGNS_ON_DEVICE[key]


def hadamard_matrix() -> torch.Tensor:
    """Sylvester's 16x16 Hadamard matrix (entries +-1), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < BLOCK:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# -------------------------------------------------------------------------------------------------- launchers
def quantize_kernel(x, *, block_2d=False, stochastic=False, seed=0, global_amax=None) -> NVFP4Tensor:
    """Numba kernel (one thread per block or tile)."""
    x2 = _as_2d(x)
    rows, cols = x2.shape
    amax = fp8.abs_max(x2) if global_amax is None else global_amax
    s = global_scale(amax)
    codes = torch.empty(rows, cols // 2, dtype=torch.uint8, device=x.device)
    scale_rows = ceil_div(rows, BLOCK) if block_2d else rows
    scales = torch.empty(scale_rows, cols // BLOCK, dtype=torch.uint8, device=x.device)
    n_threads = scales.numel()
    if n_threads:
        kernel = (_quantize_2d if block_2d else _quantize_1d)[x.dtype]
        kernel.launch(
            ceil_div(n_threads, THREADS), THREADS, (x2, codes, scales, s, _seed_tensor(seed, x.device), int(stochastic))
        )
    return NVFP4Tensor(codes, scales, s, x.shape, x.dtype, block_2d)


def dequantize_kernel(t: NVFP4Tensor, dtype=None, include_global: bool = True) -> torch.Tensor:
    dtype = dtype or t.dtype
    if dtype not in _dequantize:
        raise TypeError(f"NVFP4 dequantises to float32 or bfloat16, got {dtype}")
    rows, half = t.codes.shape
    out = torch.empty(rows, 2 * half, dtype=dtype, device=t.codes.device)
    if t.codes.numel():
        grid = max(1, min(ceil_div(t.codes.numel(), 256), 16 * sm_count(t.codes.device)))
        _dequantize[dtype].launch(
            grid, 256, (t.codes, t.block_scales, t.global_scale, out, BLOCK if t.block_2d else 1, int(include_global))
        )
    return out.view(t.shape)


def hadamard_kernel(x: torch.Tensor, seed: int = 0, inverse: bool = False) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] % BLOCK:
        raise ValueError(f"the 16-point Hadamard transform needs [M, N] with M a multiple of 16, got {tuple(x.shape)}")
    if x.dtype not in ELEMENT_TYPES:
        raise TypeError(f"hadamard16 takes float32 or bfloat16, got {x.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x)
    n = (x.shape[0] // BLOCK) * x.shape[1]
    if n:
        signs = _signs_on(seed, x.device)
        _hadamard[x.dtype].launch(ceil_div(n, THREADS), THREADS, (x, signs, y, int(inverse)))
    return y


# -------------------------------------------------------------------------------------------------- reference
def _e2m1_reference(v: torch.Tensor, stochastic: bool, index: torch.Tensor, seed_hash: int) -> torch.Tensor:
    """4-bit codes of fp32 v on the E2M1 grid (saturating; RNE with ties to the even code, or stochastic)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=v.device)
    a = v.abs().nan_to_num(nan=E2M1_MAX).clamp(max=E2M1_MAX)
    if stochastic:
        lo = torch.bucketize(a, grid, right=True) - 1  # largest grid value <= a
        hi = (lo + 1).clamp(max=7)
        frac = torch.where(lo < 7, (a - grid[lo]) / (grid[hi] - grid[lo]), torch.zeros_like(a))
        u = (counter_random_torch(index, seed_hash) >> 8).float() * U24
        code = lo + (u < frac).long()
    else:
        mids = (grid[:-1] + grid[1:]) / 2
        code = torch.bucketize(a, mids)  # a on a midpoint -> the lower code ...
        tie = (code < 7) & (a == mids[code.clamp(max=6)]) & (code % 2 == 1)
        code = code + tie.long()  # ... unless the upper one is even
    return code | (torch.signbit(v).long() << 3)


def reference_quantize(x, *, block_2d=False, stochastic=False, seed=0, global_amax=None) -> NVFP4Tensor:
    x2 = _as_2d(x).float()
    rows, cols = x2.shape
    amax = fp8.abs_max(x2) if global_amax is None else global_amax
    s = global_scale(amax)
    a = x2.abs().nan_to_num(nan=0.0)
    if block_2d:
        tr = ceil_div(rows, BLOCK)
        padded = torch.zeros(tr * BLOCK, cols, device=x.device)
        padded[:rows] = a
        block_amax = padded.view(tr, BLOCK, cols // BLOCK, BLOCK).amax((1, 3))
    else:
        block_amax = a.view(rows, cols // BLOCK, BLOCK).amax(2)
    scale_codes = fp8.reference_encode(block_amax / 6.0 * s, 1.0, "e4m3")
    scale = fp8.reference_decode(scale_codes, 1.0, "e4m3", torch.float32)
    enc = torch.where(scale > 0, s / scale, torch.zeros_like(scale))
    enc = enc.repeat_interleave(BLOCK, 1)
    if block_2d:
        enc = enc.repeat_interleave(BLOCK, 0)[:rows]
    index = torch.arange(rows * cols, device=x.device).view(rows, cols)
    seed_value = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    codes = _e2m1_reference(x2 * enc, stochastic, index, hash32_int(seed_value & 0xFFFFFFFF))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return NVFP4Tensor(packed, scale_codes, s, x.shape, x.dtype, block_2d)


def reference_dequantize(t: NVFP4Tensor, dtype=None, include_global: bool = True) -> torch.Tensor:
    dtype = dtype or t.dtype
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=t.codes.device)
    c = t.codes.long()
    codes = torch.stack([c & 15, c >> 4], dim=2).reshape(c.shape[0], -1)
    values = grid[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    scale = fp8.reference_decode(t.block_scales, 1.0, "e4m3", torch.float32).repeat_interleave(BLOCK, 1)
    if t.block_2d:
        scale = scale.repeat_interleave(BLOCK, 0)[: codes.shape[0]]
    out = values * scale
    if include_global:
        out = out / t.global_scale
    return out.to(dtype).view(t.shape)


def reference_hadamard(x: torch.Tensor, seed: int = 0, inverse: bool = False) -> torch.Tensor:
    """(H/4) D x per group of 16 rows (inverse: D (H/4) x), computed in float64, returned in x's dtype."""
    if x.dim() != 2 or x.shape[0] % BLOCK:
        raise ValueError(f"the 16-point Hadamard transform needs [M, N] with M a multiple of 16, got {tuple(x.shape)}")
    d = torch.diag(hadamard_signs(seed).double())
    h = hadamard_matrix() / 4
    q = d @ h if inverse else h @ d
    groups = x.double().reshape(-1, BLOCK, x.shape[1])
    return (q.to(x.device) @ groups).reshape(x.shape).to(x.dtype)


# ------------------------------------------------------------------------------------------------- public API
def quantize(x: torch.Tensor, *, block_2d: bool = False, stochastic: bool = False, seed=0, global_amax=None):
    """NVFP4-quantise x [..., C] (C % 16 == 0). block_2d: 16x16 tiles (weights); stochastic: stochastic rounding
    (gradients) driven by `seed` (int or int64 device tensor); global_amax: reuse an amax already computed."""
    fn = quantize_kernel if x.is_cuda else reference_quantize
    return fn(x, block_2d=block_2d, stochastic=stochastic, seed=seed, global_amax=global_amax)


def dequantize(t: NVFP4Tensor, dtype: torch.dtype | None = None, include_global: bool = True) -> torch.Tensor:
    """The tensor back in `dtype` (default: the dtype it was quantised from)."""
    return (dequantize_kernel if t.codes.is_cuda else reference_dequantize)(t, dtype, include_global)


def hadamard16(x: torch.Tensor, seed: int = 0, inverse: bool = False) -> torch.Tensor:
    """The 16-point random Hadamard transform along dim 0 of x [M, N] (M % 16 == 0); inverse=True undoes it."""
    return (hadamard_kernel if x.is_cuda else reference_hadamard)(x, seed, inverse)


def e2m1_values() -> np.ndarray:
    """The 16 values of the E2M1 codes 0..15."""
    g = np.array(E2M1_GRID, dtype=np.float32)
    return np.concatenate([g, -g])
