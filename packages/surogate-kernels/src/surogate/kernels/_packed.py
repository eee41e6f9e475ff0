"""Codecs: how bandwidth-bound kernels read and write bf16 / fp32 values, one per load or several per wide word.

Why: on the H100 a kernel issuing 2-byte loads reached ~35% of the copy bandwidth and the same kernel with 4-byte
loads 54-69% (RMSNorm forward, bf16 vs fp32, benchmarks/RESULTS.md, 2026-11-27). Numba has no vector loads, but a
tensor viewed as int64 gives 8-byte loads: 4 bf16 or 2 fp32 values per load instruction.

A codec is (word type, per_word P, unpack, pack): a kernel reads word `w = a[i]`, takes value j < P with
`unpack(w, j)` (an fp32), and writes the word holding `vals[k : k + P]` (a float32 local array) with
`pack(vals, k)`. Value j of a word sits at bits [j * width, (j + 1) * width) (little endian, as in memory).
P = 1 codecs are the plain element path (fp32 as float32, bf16 as int16 bits) used when a row length is not a
multiple of P or a tensor is not aligned. bf16 narrowing rounds to nearest even (`f32_to_bf16`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from numba import cuda, int32, int64  # noqa: F401  (cuda: the simulator's device functions close over it)

from ._runtime import SIMULATOR, Kernel, bf16_to_f32, device_function, f32_to_bf16, f32_to_f32

if SIMULATOR:

    @device_function
    def bits_to_f32(b):
        return np.array([int(b) & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]

    @device_function
    def f32_to_bits(f):
        """The float's bits as a non-negative int64."""
        return np.int64(np.array([f], dtype=np.float32).view(np.uint32)[0])

else:
    from numba.cuda import libdevice

    @device_function
    def bits_to_f32(b):
        return libdevice.int_as_float(int32(b))

    @device_function
    def f32_to_bits(f):
        return int64(libdevice.float_as_int(f)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------- codecs
@device_function
def _unpack_f32_1(w, j):
    return f32_to_f32(w)


@device_function
def _pack_f32_1(vals, k):
    return f32_to_f32(vals[k])


@device_function
def _unpack_bf16_1(w, j):
    return bf16_to_f32(w)


@device_function
def _pack_bf16_1(vals, k):
    return f32_to_bf16(vals[k])


@device_function
def _unpack_f32_2(w, j):
    return bits_to_f32((w >> (32 * j)) & 0xFFFFFFFF)


@device_function
def _pack_f32_2(vals, k):
    return (f32_to_bits(vals[k]) & 0xFFFFFFFF) | (f32_to_bits(vals[k + 1]) << 32)


@device_function
def _unpack_bf16_2(w, j):
    return bf16_to_f32((w >> (16 * j)) & 0xFFFF)


@device_function
def _pack_bf16_2(vals, k):
    lo = int32(f32_to_bf16(vals[k])) & 0xFFFF
    hi = int32(f32_to_bf16(vals[k + 1])) << 16
    return int32(lo | hi)


@device_function
def _unpack_bf16_4(w, j):
    return bf16_to_f32((w >> (16 * j)) & 0xFFFF)


@device_function
def _pack_bf16_4(vals, k):
    w = int64(f32_to_bf16(vals[k])) & 0xFFFF
    w |= (int64(f32_to_bf16(vals[k + 1])) & 0xFFFF) << 16
    w |= (int64(f32_to_bf16(vals[k + 2])) & 0xFFFF) << 32
    w |= int64(f32_to_bf16(vals[k + 3])) << 48
    return w


class Codec(NamedTuple):
    word: str  # numba type name of a word in signatures
    per_word: int
    unpack: object
    pack: object
    torch_word: torch.dtype  # the view a launcher passes: t.view(torch_word)


CODECS: dict[tuple[torch.dtype, int], Codec] = {
    (torch.float32, 1): Codec("float32", 1, _unpack_f32_1, _pack_f32_1, torch.float32),
    (torch.bfloat16, 1): Codec("int16", 1, _unpack_bf16_1, _pack_bf16_1, torch.bfloat16),
    (torch.float32, 2): Codec("int64", 2, _unpack_f32_2, _pack_f32_2, torch.int64),
    (torch.bfloat16, 2): Codec("int32", 2, _unpack_bf16_2, _pack_bf16_2, torch.int32),
    (torch.bfloat16, 4): Codec("int64", 4, _unpack_bf16_4, _pack_bf16_4, torch.int64),
}
WIDE = {torch.float32: 2, torch.bfloat16: 4}  # values per 8-byte word


def kernels_per_codec(make, signature: str, name: str, keys=None, **options) -> dict[tuple[torch.dtype, int], Kernel]:
    """Build `make(codec)` for each codec key (default: every dtype, element and 8-byte word paths).
    `{w}` in `signature` becomes the codec's word type."""
    keys = keys or [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 2), (torch.bfloat16, 4)]
    kernels = {}
    for key in keys:
        codec = CODECS[key]
        label = f"{name}[{str(key[0]).split('.')[-1]}x{key[1]}]"
        kernels[key] = Kernel(make(codec), signature.format(w=codec.word), label, **options)
    return kernels


def per_word(t: torch.Tensor, row_length: int, wide: int | None = None) -> int:
    """The widest codec for `t` (contiguous): WIDE[dtype] values per word if every row of `row_length` values
    starts on a word boundary, else 1."""
    p = wide or WIDE[t.dtype]
    if row_length % p == 0 and t.data_ptr() % (p * t.element_size()) == 0:
        return p
    return 1


def as_words(t: torch.Tensor, p: int) -> torch.Tensor:
    """`t` viewed as the words of the (dtype, p) codec (a no-op view for p = 1)."""
    return t if p == 1 else t.view(CODECS[(t.dtype, p)].torch_word)
