"""bitsandbytes' 8-bit dynamic quantisation map and blockwise quantisation on it (Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", 2021; "8-Bit Approximations for Parallelism in Deep Learning", 2015).

The map: for i = 0..6, the midpoints of linspace(0.1, 1, k_i + 1) (fp32) times 10^(i - 6), with k_i = 2^i in the
signed map (mirrored to negatives) and 2^(i + 1) in the unsigned map; plus 0 and 1; sorted into 256 fp32 values.
Signed: 127 negatives down to -0.99297, zero at code 127, 1.0 at code 255. Unsigned: zero at code 0, 1.0 at 255.
Blockwise quantisation (bitsandbytes' reference semantics): absmax per block (fp32); v = clamp(x * fp32(1 / absmax),
-1, 1); code = the nearest map value by fp32 midpoints, a value exactly on a midpoint goes to the lower code.
Decode: map[code] * absmax (fp32). Users: NF4's double quantisation of its absmax values (blocks of 256, signed map,
mean subtracted) and the 8-bit AdamW states (blocks of 2048, signed map for m, unsigned for v).
The device helper `quantize_to_map` is the same rule as a binary search over the 255 midpoints (8 steps).
"""

from __future__ import annotations

import functools

import torch

from surogate.kernels._runtime import device_function

MAX_EXPONENT_BITS = 7


@functools.cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values: list[float] = []
    for i in range(MAX_EXPONENT_BITS):
        n_fractions = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, n_fractions + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        level = 10 ** (i - (MAX_EXPONENT_BITS - 1))  # 1e-6 ... 1
        values += (level * centres).tolist()
        if signed:
            values += (-level * centres).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


_ON_DEVICE: dict[tuple[bool, torch.device], torch.Tensor] = {}


def dynamic_map(signed: bool = True, device="cpu") -> torch.Tensor:
    """The 256 sorted fp32 values of the signed (m, NF4 absmax) or unsigned (v) dynamic map. Cached per device (no
    host-to-device copy after the first call: CUDA-graph capturable). Do not modify the returned tensor."""
    key = (signed, torch.device(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = _dynamic_map_cpu(signed).to(device)
    return _ON_DEVICE[key]


def midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 fp32 decision boundaries between neighbouring map values."""
    return (qmap[:-1] + qmap[1:]) / 2


@device_function
def quantize_to_map(v, mids):
    """Code of v on a sorted 256-entry map, given its 255 midpoints: the number of midpoints strictly below v."""
    lo = 0
    hi = 255
    while lo < hi:
        mid = (lo + hi) >> 1
        if mids[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


def reference_quantize_normalised(v: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """uint8 codes of values already in [-1, 1] (torch.bucketize = count of midpoints strictly below)."""
    return torch.bucketize(v.float(), midpoints(qmap.to(v.device))).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, block_size: int, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [n], fp32 absmax [ceil(n / block_size)]) of flat x; the last block may be partial. Torch ops on
    x's device: used for small arrays (NF4's absmax values), the optimizer does the same inside its kernel."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    padded = torch.zeros(n_blocks * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    blocks = padded.view(n_blocks, block_size)
    absmax = blocks.abs().amax(1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    v = (blocks * inv[:, None]).clamp(-1, 1).reshape(-1)[:n]
    return reference_quantize_normalised(v, dynamic_map(signed, x.device)), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, block_size: int, signed: bool = True):
    """fp32 map[codes] * absmax[block]."""
    qmap = dynamic_map(signed, codes.device)
    n = codes.numel()
    scale = absmax.repeat_interleave(block_size)[:n]
    return qmap[codes.reshape(-1).long()] * scale
