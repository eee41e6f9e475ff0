"""NF4 (4-bit NormalFloat, QLoRA), byte-compatible with bitsandbytes' `quantize_4bit(..., quant_type="nf4")`.

Format: the tensor is flattened and cut into blocks of `block_size` (default 64; the last block may be partial).
Each block keeps absmax = max |x| (fp32); each value becomes the code of the NF4 table entry nearest to
x * fp32(1 / absmax) (nearest by the 15 fp32 midpoints of the table; a value exactly on a midpoint takes the lower
code), two codes per byte: element 2i in the HIGH nibble, 2i + 1 in the low nibble (an odd tail is padded with the
code of 0.0). Double quantisation (default on): offset = mean(absmax) (fp32), then absmax - offset is quantised with
bitsandbytes' signed 8-bit dynamic map in blocks of 256 (dynamic8.py): absmax = map[code] * scale2 + offset,
two fp32 roundings (the kernel uses an unfused multiply so it matches).
Dequantisation: table[code] * absmax in fp32, rounded once to the output dtype (bf16 or fp32).
Error bound (tested): |x - x_hat| <= 0.13852 * absmax + |absmax - absmax_hat|, 0.13852 being half the widest gap
of the table (between 0.72296 and 1); the absmax error is at most half a dynamic-map gap (<= 0.0071) of the
group's max |absmax - offset|.
Kernels: quantise, one thread per block (a load-time op); dequantise, one thread per packed byte with the double-
quantised absmax decoded on the fly (bf16 written as int32 pairs: 4-byte coalesced stores).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda, float32, int32

from surogate.kernels._runtime import ELEMENT_TYPES, Kernel, ceil_div, device_function, f32_to_bf16, sm_count

from . import dynamic8
from ._device import mul_rn

# The 16 NF4 values, as bitsandbytes defines them (QLoRA's normal-quantile construction normalised to [-1, 1],
# stored as these fp32 literals in bitsandbytes' functional.py / kernels.cu).
NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_MIDPOINTS = ((NF4_TABLE[:-1] + NF4_TABLE[1:]) / np.float32(2)).astype(np.float32)
ZERO_CODE = 7
DOUBLE_QUANT_BLOCK = 256
THREADS = 256


@dataclass
class NF4Tensor:
    """A packed NF4 tensor. With double quantisation, absmax is None and (absmax_codes, absmax_scale,
    absmax_offset) hold it; without, the three are None."""

    codes: torch.Tensor  # uint8 [ceil(n / 2)]
    shape: torch.Size
    dtype: torch.dtype  # the dtype it was quantised from: dequantize's default
    block_size: int
    absmax: torch.Tensor | None = None  # fp32 [n_blocks]
    absmax_codes: torch.Tensor | None = None  # uint8 [n_blocks]
    absmax_scale: torch.Tensor | None = None  # fp32 [ceil(n_blocks / 256)]
    absmax_offset: torch.Tensor | None = None  # fp32 [1]

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if len(self.shape) else 1

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax per block (decoded when double-quantised)."""
        if not self.double_quant:
            return self.absmax
        scaled = dynamic8.dequantize_blockwise(self.absmax_codes, self.absmax_scale, DOUBLE_QUANT_BLOCK)
        return scaled + self.absmax_offset

    def to(self, device) -> NF4Tensor:
        move = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return NF4Tensor(**move)


# ---------------------------------------------------------------------------------------------------- kernels
@device_function
def nf4_code(v):
    c = 0
    for j in range(15):
        if v > NF4_MIDPOINTS[j]:
            c += 1
    return c


def _make_quantize(load, store):
    def nf4_quantize(x, codes, absmax, block_size):
        """One thread per block: absmax, then codes (pairs never straddle blocks: block_size is even)."""
        b = cuda.grid(1)
        if b >= absmax.shape[0]:
            return
        n = x.shape[0]
        start = b * block_size
        end = min(start + block_size, n)
        m = float32(0.0)
        for i in range(start, end):
            a = abs(load(x[i]))
            if a > m:
                m = a
        absmax[b] = m
        inv = float32(1.0) / max(m, float32(1e-38))
        for i in range(start, end, 2):
            hi = nf4_code(load(x[i]) * inv)  # no clamp to [-1, 1]: the codes are the same
            lo = ZERO_CODE
            if i + 1 < end:
                lo = nf4_code(load(x[i + 1]) * inv)
            codes[i >> 1] = (hi << 4) | lo

    return nf4_quantize


@device_function
def _block_scale(j2, block_size, absmax, qabsmax, absmax2, offset, dmap, double):
    """fp32 absmax of the block holding element j2 (decoded from the dynamic map when double-quantised)."""
    b = j2 // block_size
    if double == 0:
        return absmax[b]
    return mul_rn(dmap[qabsmax[b]], absmax2[b // DOUBLE_QUANT_BLOCK]) + offset[0]


def _make_dequantize_bf16():
    def nf4_dequantize_bf16(codes, absmax, qabsmax, absmax2, offset, dmap, out_pairs, block_size, double):
        """out_pairs: the bf16 output viewed as int32, one pair of values per code byte."""
        j = cuda.grid(1)
        step = cuda.gridsize(1)
        while j < codes.shape[0]:
            s = _block_scale(2 * j, block_size, absmax, qabsmax, absmax2, offset, dmap, double)
            c = int32(codes[j])
            first = f32_to_bf16(mul_rn(NF4_TABLE[c >> 4], s))
            second = f32_to_bf16(mul_rn(NF4_TABLE[c & 15], s))
            out_pairs[j] = (int32(first) & 0xFFFF) | (int32(second) << 16)
            j += step

    return nf4_dequantize_bf16


def _make_dequantize_f32():
    def nf4_dequantize_f32(codes, absmax, qabsmax, absmax2, offset, dmap, out, block_size, double):
        j = cuda.grid(1)
        step = cuda.gridsize(1)
        while j < codes.shape[0]:
            s = _block_scale(2 * j, block_size, absmax, qabsmax, absmax2, offset, dmap, double)
            c = int32(codes[j])
            out[2 * j] = mul_rn(NF4_TABLE[c >> 4], s)
            out[2 * j + 1] = mul_rn(NF4_TABLE[c & 15], s)
            j += step

    return nf4_dequantize_f32


_quantize = {
    dtype: Kernel(_make_quantize(load, store), f"void({t}[::1], uint8[::1], float32[::1], int64)", f"nf4_quantize[{t}]")
    for dtype, (t, load, store) in ELEMENT_TYPES.items()
}
_DEQ_ARGS = "uint8[::1], float32[::1], uint8[::1], float32[::1], float32[::1], float32[::1]"
_dequantize = {
    torch.bfloat16: Kernel(
        _make_dequantize_bf16(), f"void({_DEQ_ARGS}, int32[::1], int64, int32)", "nf4_dequantize[bf16]"
    ),
    torch.float32: Kernel(
        _make_dequantize_f32(), f"void({_DEQ_ARGS}, float32[::1], int64, int32)", "nf4_dequantize[float32]"
    ),
}


# -------------------------------------------------------------------------------------------------- launchers
def _check(w: torch.Tensor, block_size: int):
    if w.dtype not in ELEMENT_TYPES:
        raise TypeError(f"NF4 quantises float32 or bfloat16 tensors, got {w.dtype}")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"NF4 block_size must be even and >= 2 (bitsandbytes uses 32..4096), got {block_size}")


def _double_quantize(absmax: torch.Tensor, packed: NF4Tensor):
    """bitsandbytes' compress_statistics: the absmax values minus their mean, 8-bit dynamic, blocks of 256."""
    offset = absmax.mean().reshape(1)
    codes, scale = dynamic8.quantize_blockwise(absmax - offset, DOUBLE_QUANT_BLOCK, signed=True)
    packed.absmax_codes, packed.absmax_scale, packed.absmax_offset = codes, scale, offset


def quantize_kernel(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Numba kernel for codes and absmax; the double quantisation of the (n / 64) absmax values runs as torch ops."""
    _check(w, block_size)
    flat = w.detach().reshape(-1).contiguous()
    n = flat.numel()
    n_blocks = ceil_div(n, block_size)
    codes = torch.empty(ceil_div(n, 2), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    if n:
        _quantize[w.dtype].launch(ceil_div(n_blocks, THREADS), THREADS, (flat, codes, absmax, block_size))
    packed = NF4Tensor(codes, w.shape, w.dtype, block_size, absmax=absmax)
    if double_quant:
        _double_quantize(absmax, packed)
        packed.absmax = None
    return packed


def dequantize_kernel(packed: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Numba kernel: the tensor in `dtype` (bf16 or fp32; default the original dtype)."""
    dtype = dtype or packed.dtype
    if dtype not in _dequantize:
        raise TypeError(f"NF4 dequantises to float32 or bfloat16, got {dtype}")
    device = packed.codes.device
    n_bytes = packed.codes.numel()
    out = torch.empty(2 * n_bytes, dtype=dtype, device=device)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=device)
    dummy_u = torch.zeros(1, dtype=torch.uint8, device=device)
    if packed.double_quant:
        absmax = dummy_f
        qabs, scale2, offset = packed.absmax_codes, packed.absmax_scale, packed.absmax_offset
        dmap = dynamic8.dynamic_map(True, device)
    else:
        absmax, qabs, scale2, offset, dmap = packed.absmax, dummy_u, dummy_f, dummy_f, dummy_f
    if n_bytes:
        target = out.view(torch.int32) if dtype == torch.bfloat16 else out
        grid = max(1, min(ceil_div(n_bytes, THREADS), 16 * sm_count(device)))
        _dequantize[dtype].launch(
            grid,
            THREADS,
            (packed.codes, absmax, qabs, scale2, offset, dmap, target, packed.block_size, int(packed.double_quant)),
        )
    return out[: packed.numel].view(packed.shape)


# -------------------------------------------------------------------------------------------------- reference
def reference_quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    _check(w, block_size)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = ceil_div(n, block_size)
    padded = torch.zeros(n_blocks * block_size, dtype=torch.float32, device=w.device)
    padded[:n] = flat
    blocks = padded.view(n_blocks, block_size)
    absmax = blocks.abs().amax(1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (blocks * inv[:, None]).reshape(-1)[:n]
    mids = torch.from_numpy(NF4_MIDPOINTS).to(w.device)
    codes = torch.bucketize(scaled, mids).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
    packed_codes = (codes[0::2] << 4) | codes[1::2]
    packed = NF4Tensor(packed_codes, w.shape, w.dtype, block_size, absmax=absmax)
    if double_quant:
        _double_quantize(absmax, packed)
        packed.absmax = None
    return packed


def reference_dequantize(packed: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or packed.dtype
    table = torch.from_numpy(NF4_TABLE).to(packed.codes.device)
    c = packed.codes.long()
    codes = torch.stack([c >> 4, c & 15], dim=1).reshape(-1)[: packed.numel]
    scale = packed.block_absmax().repeat_interleave(packed.block_size)[: packed.numel]
    return (table[codes] * scale).to(dtype).view(packed.shape)


# ------------------------------------------------------------------------------------------------- public API
def quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Pack w (any shape, fp32 or bf16) as NF4; CUDA tensors use the Numba kernel, CPU tensors the reference."""
    return (quantize_kernel if w.is_cuda else reference_quantize)(w, block_size, double_quant)


def dequantize(packed: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor back in `dtype` (default: the dtype it was quantised from)."""
    return (dequantize_kernel if packed.codes.is_cuda else reference_dequantize)(packed, dtype)
