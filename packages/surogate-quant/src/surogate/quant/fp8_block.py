"""FP8 E4M3 weights in 2-D tiles (QLoRA-FP8): one fp32 scale per tile of `tile` x `tile` values (default 128).

Quantise: per tile amax; scale = 448 / amax (1 for an all-zero tile); code = E4M3(x * scale) (fp8.py's encoding:
round to nearest even, saturating); the tile keeps scale_inv = amax / 448 (0 for an all-zero tile).
Dequantise: value(code) * scale_inv (fp32), rounded once to the output dtype. Error: at most half an E4M3 ulp of
|x| (2^-4 relative) for values within 2^6..2^8 of their tile's max, plus subnormal steps of 2^-9 * scale_inv below.
Shapes: 2-D [R, C]; partial tiles at the edges. Kernels: quantise, one block of 256 threads per tile (amax by
block_max, then encode); dequantise, one thread per value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from numba import cuda, float32

from surogate.kernels._runtime import ELEMENT_TYPES, REDUCE_SLOTS, Kernel, block_max, ceil_div, sm_count

from . import fp8

E4M3_MAX = 448.0
THREADS = 256
_encode, _decode = fp8.make_codec(fp8.FORMATS["e4m3"])


@dataclass
class Fp8BlockTensor:
    codes: torch.Tensor  # uint8 E4M3 [R, C]
    scale_inv: torch.Tensor  # fp32 [ceil(R / tile), ceil(C / tile)]
    dtype: torch.dtype
    tile: int = 128

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale_inv.numel() * 4

    def to(self, device) -> Fp8BlockTensor:
        return Fp8BlockTensor(self.codes.to(device), self.scale_inv.to(device), self.dtype, self.tile)


# ---------------------------------------------------------------------------------------------------- kernels
def _make_quantize(load):
    def fp8_block_quantize(x, codes, scale_inv, tile):
        """One block per tile: blockIdx.x = tile column, blockIdx.y = tile row."""
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        r0 = cuda.blockIdx.y * tile
        c0 = cuda.blockIdx.x * tile
        r1 = min(r0 + tile, x.shape[0])
        c1 = min(c0 + tile, x.shape[1])
        width = c1 - c0
        count = (r1 - r0) * width
        m = float32(0.0)
        k = cuda.threadIdx.x
        while k < count:
            a = abs(load(x[r0 + k // width, c0 + k % width]))
            if a > m:
                m = a
            k += cuda.blockDim.x
        m = block_max(m, scratch)
        scale = float32(1.0)
        if m > float32(0.0):
            scale = float32(E4M3_MAX) / m
        if cuda.threadIdx.x == 0:
            scale_inv[cuda.blockIdx.y, cuda.blockIdx.x] = m / float32(E4M3_MAX)
        k = cuda.threadIdx.x
        while k < count:
            r = r0 + k // width
            c = c0 + k % width
            codes[r, c] = _encode(load(x[r, c]), scale)
            k += cuda.blockDim.x

    return fp8_block_quantize


def _make_dequantize(store):
    def fp8_block_dequantize(codes, scale_inv, out, tile):
        i = cuda.grid(1)
        step = cuda.gridsize(1)
        cols = codes.shape[1]
        while i < codes.shape[0] * cols:
            r = i // cols
            c = i % cols
            out[r, c] = store(_decode(codes[r, c]) * scale_inv[r // tile, c // tile])
            i += step

    return fp8_block_dequantize


_quantize = {
    dtype: Kernel(
        _make_quantize(load), f"void({t}[:, ::1], uint8[:, ::1], float32[:, ::1], int64)", f"fp8_block_quantize[{t}]"
    )
    for dtype, (t, load, store) in ELEMENT_TYPES.items()
}
_dequantize = {
    dtype: Kernel(
        _make_dequantize(store),
        f"void(uint8[:, ::1], float32[:, ::1], {t}[:, ::1], int64)",
        f"fp8_block_dequantize[{t}]",
    )
    for dtype, (t, load, store) in ELEMENT_TYPES.items()
}


# -------------------------------------------------------------------------------------------------- launchers
def _check(w: torch.Tensor, tile: int):
    if w.dim() != 2:
        raise ValueError(f"FP8 block quantisation takes a 2-D weight, got shape {tuple(w.shape)}")
    if w.dtype not in ELEMENT_TYPES:
        raise TypeError(f"FP8 block quantisation takes float32 or bfloat16, got {w.dtype}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")


def quantize_kernel(w: torch.Tensor, tile: int = 128) -> Fp8BlockTensor:
    _check(w, tile)
    w = w.detach().contiguous()
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scale_inv = torch.empty(ceil_div(w.shape[0], tile), ceil_div(w.shape[1], tile), device=w.device)
    if w.numel():
        grid = (scale_inv.shape[1], scale_inv.shape[0])
        _quantize[w.dtype].launch(grid, THREADS, (w, codes, scale_inv, tile))
    return Fp8BlockTensor(codes, scale_inv, w.dtype, tile)


def dequantize_kernel(t: Fp8BlockTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or t.dtype
    if dtype not in _dequantize:
        raise TypeError(f"FP8 block dequantisation writes float32 or bfloat16, got {dtype}")
    out = torch.empty(t.codes.shape, dtype=dtype, device=t.codes.device)
    n = t.codes.numel()
    if n:
        grid = max(1, min(ceil_div(n, THREADS), 16 * sm_count(t.codes.device)))
        _dequantize[dtype].launch(grid, THREADS, (t.codes, t.scale_inv, out, t.tile))
    return out


def _expand(per_tile: torch.Tensor, shape, tile: int) -> torch.Tensor:
    return per_tile.repeat_interleave(tile, 0)[: shape[0]].repeat_interleave(tile, 1)[:, : shape[1]]


def reference_quantize(w: torch.Tensor, tile: int = 128) -> Fp8BlockTensor:
    _check(w, tile)
    rows, cols = w.shape
    tr, tc = ceil_div(rows, tile), ceil_div(cols, tile)
    x = w.detach().float()
    padded = torch.zeros(tr * tile, tc * tile, device=w.device)
    padded[:rows, :cols] = x.abs().nan_to_num(nan=0.0)
    amax = padded.view(tr, tile, tc, tile).amax((1, 3))
    # tensor / tensor: torch computes `scalar / tensor` as reciprocal(tensor) * scalar (two roundings)
    scale = torch.where(amax > 0, torch.full_like(amax, E4M3_MAX) / amax, torch.ones_like(amax))
    codes = fp8.reference_encode(x * _expand(scale, w.shape, tile), 1.0, "e4m3")
    return Fp8BlockTensor(codes, amax / E4M3_MAX, w.dtype, tile)


def reference_dequantize(t: Fp8BlockTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    values = fp8.reference_decode(t.codes, 1.0, "e4m3", torch.float32)
    return (values * _expand(t.scale_inv, t.codes.shape, t.tile)).to(dtype or t.dtype)


def quantize(w: torch.Tensor, tile: int = 128) -> Fp8BlockTensor:
    """E4M3 codes with one fp32 scale per tile x tile block (CUDA: Numba kernel; CPU: torch reference)."""
    return (quantize_kernel if w.is_cuda else reference_quantize)(w, tile)


def dequantize(t: Fp8BlockTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (dequantize_kernel if t.codes.is_cuda else reference_dequantize)(t, dtype)
