"""Device helpers shared by the format modules: float bit casts, unfused multiply, minifloat rounding, a counter hash.

Everything here is integer bit arithmetic on fp32 bit patterns, so the same kernels run on the GPU and in the CUDA
simulator (which has no fp8/fp4 types and no libdevice). A "minifloat" is described by its mantissa bits MBITS and
its smallest normal exponent EMIN (bias = 1 - EMIN): E4M3 (3, -6), E5M2 (2, -14), E2M1 (1, 0).
Rounding: to nearest, ties to even code (as cvt.rn / torch casts), or toward zero (the lower neighbour, from which
stochastic rounding rounds up with probability equal to the exact fp32 fraction of the gap).
Saturation is done by the callers: they clamp the fp32 bits to the format's largest finite value first.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import float32, int64, uint64

from surogate.kernels._runtime import SIMULATOR, device_function

if SIMULATOR:

    @device_function
    def f32_bits(f):
        """The fp32 bit pattern of f (an int; the sign is bit 31)."""
        return int(np.array([f], dtype=np.float32).view(np.uint32)[0])

    @device_function
    def bits_f32(b):
        return np.array([int(b) & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]

    @device_function
    def mul_rn(a, b):
        """a * b rounded once, never fused into a following add (the simulator never fuses)."""
        return np.float32(a) * np.float32(b)

    @device_function
    def div_rn(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.float32(a) / np.float32(b)

else:
    from numba.cuda import libdevice

    @device_function
    def f32_bits(f):
        return libdevice.float_as_int(float32(f))

    @device_function
    def bits_f32(b):
        return libdevice.int_as_float(np.int32(b))

    @device_function
    def mul_rn(a, b):
        # libdevice's __nv_fmul_rn is never contracted into an FMA (NVVM contracts a*b + c by default), so results
        # match torch's unfused fp32 math bit for bit.
        return libdevice.fmul_rn(float32(a), float32(b))

    @device_function
    def div_rn(a, b):
        return libdevice.fdiv_rn(float32(a), float32(b))


@device_function
def minifloat_rne(a, MBITS, EMIN):
    """Magnitude code (no sign) of the minifloat nearest to the non-negative fp32 with bits `a` (ties to even code).
    `a` must already be clamped to the format's largest finite value and must not be NaN."""
    shift = 23 - MBITS
    efield = a >> 23
    if efield == 0:  # zero or an fp32 subnormal: far below every minifloat subnormal
        return 0
    e = efield - 127
    if e >= EMIN:  # normal: round the fp32 mantissa to MBITS bits (a carry moves into the exponent), rebias
        r = (a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift
        return r - ((126 + EMIN) << MBITS)
    s = shift + EMIN - e  # subnormal: value = q * 2^(EMIN - MBITS), q = mant >> s with the implicit bit
    if s > 24:  # below half the smallest subnormal
        return 0
    mant = (a & 0x7FFFFF) | 0x800000
    q = mant >> s
    rem = mant & ((1 << s) - 1)
    half = 1 << (s - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1  # q == 2^MBITS is the smallest normal: the code space is continuous
    return q


@device_function
def minifloat_rz(a, MBITS, EMIN):
    """Like minifloat_rne but rounding toward zero (the lower neighbour; stochastic rounding starts here)."""
    shift = 23 - MBITS
    efield = a >> 23
    if efield == 0:
        return 0
    e = efield - 127
    if e >= EMIN:
        return (a >> shift) - ((126 + EMIN) << MBITS)
    s = shift + EMIN - e
    if s > 24:
        return 0
    return ((a & 0x7FFFFF) | 0x800000) >> s


@device_function
def minifloat_value(c, MBITS, EMIN):
    """fp32 value of the non-negative magnitude code c (finite codes only)."""
    e = c >> MBITS
    m = c & ((1 << MBITS) - 1)
    if e == 0:
        return float32(m) * bits_f32((127 + EMIN - MBITS) << 23)  # m * 2^(EMIN - MBITS), exact
    return bits_f32(((e + 126 + EMIN) << 23) | (m << (23 - MBITS)))


@device_function
def hash32(x):
    """murmur3's 32-bit finaliser: a bijection on [0, 2^32) with full avalanche. Products of two values below 2^32
    fit in uint64, so nothing wraps (the simulator's numpy scalars stay quiet)."""
    x = uint64(x) & uint64(0xFFFFFFFF)
    x ^= x >> uint64(16)
    x = (x * uint64(0x85EBCA6B)) & uint64(0xFFFFFFFF)
    x ^= x >> uint64(13)
    x = (x * uint64(0xC2B2AE35)) & uint64(0xFFFFFFFF)
    x ^= x >> uint64(16)
    return x


@device_function
def counter_random(index, seed_hash):
    """32 random bits for element `index` of a stream keyed by seed_hash = hash32(seed) (counter-based: any order)."""
    return int64(hash32((uint64(index) & uint64(0xFFFFFFFF)) ^ uint64(seed_hash)))


# ---------------------------------------------------------------------------------------------------------------
# The same hash in torch (int64 arithmetic, masked to 32 bits): the references use it so SR is reproducible.
def hash32_torch(x):
    """murmur3 fmix32 on an int64 tensor of values in [0, 2^32) (int64 products wrap, their low 32 bits are exact)."""
    m = 0xFFFFFFFF
    x = x.to(torch.int64) & m
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & m
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & m
    x = x ^ (x >> 16)
    return x


def hash32_int(x: int) -> int:
    """hash32 on a Python int (seeds are hashed on the host once)."""
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & m
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & m
    x ^= x >> 16
    return x


def counter_random_torch(index: torch.Tensor, seed_hash: int) -> torch.Tensor:
    """counter_random for a tensor of element indices."""
    return hash32_torch((index.to(torch.int64) & 0xFFFFFFFF) ^ seed_hash)
