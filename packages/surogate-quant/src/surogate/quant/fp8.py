"""FP8 E4M3 / E5M2 with per-tensor scales: encode (+ fused abs-max), decode, quantise + transpose, delayed scaling.

Formats (OCP FP8, as torch.float8_e4m3fn / torch.float8_e5m2):
- "e4m3": 1-4-3, bias 7, max 448, no infinities, NaN = 0x7F / 0xFF (forward activations and weights).
- "e5m2": 1-5-2, bias 15, max 57344, +-inf = 0x7C / 0xFC, NaN = 0x7D..0x7F (+ sign) (gradients).
Numerics:
- encode(x, scale): code = saturate(x * scale), the product rounded once to fp32, then to the nearest FP8 value, ties
  to even; |x * scale| above the max (and +-inf) saturates to +-max; NaN gives 0x7F | sign(x) << 7. Codes are uint8.
- decode(codes, scale): value(code) / scale, an IEEE fp32 division, then rounded once to the output dtype.
- The fused abs-max is max |x| over the input (NaN ignored), folded into `amax_out` with an atomic max.
- Bit for bit equal to torch's casts (`(x.float() * scale).clamp(-max, max).to(torch.float8_e4m3fn)`); the kernels
  do it in integer arithmetic on the fp32 bits, so they also run in the CUDA simulator (no fp8 types there).
Shapes: any shape for encode/decode (flattened); encode_transpose takes 2-D [R, C] and returns codes [C, R]
(the column-major operand of the wgrad GEMM); encode_both returns both layouts from one read of x (a gradient
feeding dgrad and wgrad, a weight cached for forward and dgrad). BF16 inputs whose size is a multiple of 4 are
encoded four at a time (one 8-byte load, one 4-byte store per thread): the same codes, fewer memory transactions;
the transposing kernels do the same for BF16 [R, C] with R and C multiples of 4 (64x64 tiles through shared memory,
8-byte loads of 4 values, 4-byte stores of 4 codes on both sides).
`out` / `out_t` arguments write into given uint8 buffers (cached weights are re-encoded in place, so CUDA graphs
that read them stay valid). Scales are Python floats or fp32 tensors with one element (device
tensors keep the step free of host syncs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from numba import cuda, float32

from surogate.kernels._runtime import (
    ELEMENT_TYPES,
    REDUCE_SLOTS,
    Kernel,
    block_max,
    ceil_div,
    device_function,
    sm_count,
)

from ._device import bits_f32, div_rn, f32_bits, minifloat_rne, minifloat_value


@dataclass(frozen=True)
class Fp8Format:
    name: str
    max: float  # largest finite value
    torch_dtype: torch.dtype
    mbits: int
    emin: int  # exponent of the smallest normal
    max_bits: int  # fp32 bit pattern of `max`
    has_inf: bool


FORMATS = {
    "e4m3": Fp8Format("e4m3", 448.0, torch.float8_e4m3fn, 3, -6, 0x43E00000, False),
    "e5m2": Fp8Format("e5m2", 57344.0, torch.float8_e5m2, 2, -14, 0x47600000, True),
}
NAN_CODE = 0x7F  # | sign << 7, in both formats
THREADS = 256
TILE = 32  # encode_transpose tile edge
TILE_PAD = TILE + 1  # shared-memory row pitch: column reads hit 32 different banks
WTILE = 64  # the BF16 word kernel's tile edge: 16 words of 4 values per tile row
WTILE_PAD = WTILE + 1


def get_format(fmt: str) -> Fp8Format:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"FP8 format must be 'e4m3' or 'e5m2', got {fmt!r}") from None


# ---------------------------------------------------------------------------------------------------- device codec
def make_codec(f: Fp8Format):
    """(encode(x, scale) -> code, decode(code) -> fp32 value) device functions for one format."""
    MBITS, EMIN, MAXB, HAS_INF = f.mbits, f.emin, f.max_bits, f.has_inf

    @device_function
    def encode(x, scale):
        sign = (f32_bits(x) >> 31) & 1
        a = f32_bits(x * scale) & 0x7FFFFFFF
        if a > 0x7F800000:
            return NAN_CODE | (sign << 7)
        if a > MAXB:
            a = MAXB
        return minifloat_rne(a, MBITS, EMIN) | (sign << 7)

    @device_function
    def decode(code):
        c = int(code)
        mag = c & 0x7F
        sign = (c >> 7) & 1
        if HAS_INF:
            if (mag >> MBITS) == 0x1F:
                if (mag & 3) == 0:
                    return bits_f32((sign << 31) | 0x7F800000)
                return bits_f32(0x7FC00000)
        elif mag == 0x7F:
            return bits_f32(0x7FC00000)
        v = minifloat_value(mag, MBITS, EMIN)
        return -v if sign == 1 else v

    return encode, decode


_CODECS = {name: make_codec(f) for name, f in FORMATS.items()}


# ---------------------------------------------------------------------------------------------------------- kernels
def _make_encode(encode, load):
    def fp8_encode(x, scale, codes, amax, track_amax):
        s = scale[0]
        m = float32(0.0)
        i = cuda.grid(1)
        step = cuda.gridsize(1)
        while i < x.shape[0]:
            v = load(x[i])
            codes[i] = encode(v, s)
            av = abs(v)
            if av > m:  # NaN compares false: ignored
                m = av
            i += step
        if track_amax != 0:
            scratch = cuda.shared.array(REDUCE_SLOTS, float32)
            m = block_max(m, scratch)
            if cuda.threadIdx.x == 0:
                cuda.atomic.max(amax, 0, m)

    return fp8_encode


def _make_encode_bf16x4(encode):
    def fp8_encode_bf16x4(x4, scale, codes4, amax, track_amax):
        """x4: the BF16 input as int64 words (4 values each), codes4: the codes as int32 words (4 codes each)."""
        s = scale[0]
        m = float32(0.0)
        i = cuda.grid(1)
        step = cuda.gridsize(1)
        while i < x4.shape[0]:
            w = x4[i]
            packed = 0
            for j in range(4):
                v = bits_f32(((w >> (16 * j)) & 0xFFFF) << 16)  # bf16 -> fp32: the bits in the upper half
                packed |= encode(v, s) << (8 * j)
                av = abs(v)
                if av > m:  # NaN compares false: ignored
                    m = av
            if packed >= 0x80000000:  # the int32 word with these bits
                packed -= 0x100000000
            codes4[i] = packed
            i += step
        if track_amax != 0:
            scratch = cuda.shared.array(REDUCE_SLOTS, float32)
            m = block_max(m, scratch)
            if cuda.threadIdx.x == 0:
                cuda.atomic.max(amax, 0, m)

    return fp8_encode_bf16x4


def _make_encode_transpose_bf16x4(encode):
    def fp8_encode_transpose_bf16x4(x4, scale, codes4, codes_t4, amax, track_amax, write_codes):
        """BF16 x [R, C] viewed as int64 words x4 [R, C/4] -> codes_t4 [C, R/4] (int32 words of 4 codes) and, when
        write_codes, codes4 [R, C/4]; one 64x64 tile per block of 256 threads: 16 threads per tile row load its
        16 words (8-byte loads), then 16 threads per output row each pack 4 codes of a tile column (4-byte
        stores). R and C are multiples of 4."""
        tile = cuda.shared.array((WTILE, WTILE_PAD), float32)
        tid = cuda.threadIdx.x
        lane = tid % 16
        row0 = cuda.blockIdx.y * WTILE
        col0 = cuda.blockIdx.x * WTILE
        s = scale[0]
        m = float32(0.0)
        for p in range(4):
            r = tid // 16 + 16 * p
            gr = row0 + r
            gw = col0 // 4 + lane
            if gr < x4.shape[0] and gw < x4.shape[1]:
                w = x4[gr, gw]
                packed = 0
                for q in range(4):
                    v = bits_f32(((w >> (16 * q)) & 0xFFFF) << 16)
                    tile[r, 4 * lane + q] = v
                    if write_codes != 0:
                        packed |= encode(v, s) << (8 * q)
                    av = abs(v)
                    if av > m:
                        m = av
                if write_codes != 0:
                    if packed >= 0x80000000:
                        packed -= 0x100000000
                    codes4[gr, gw] = packed
        cuda.syncthreads()
        for p in range(4):
            c = tid // 16 + 16 * p  # tile column = output row
            gr = col0 + c
            gw = row0 // 4 + lane
            if gr < codes_t4.shape[0] and gw < codes_t4.shape[1]:
                packed = 0
                for q in range(4):
                    packed |= encode(tile[4 * lane + q, c], s) << (8 * q)
                if packed >= 0x80000000:
                    packed -= 0x100000000
                codes_t4[gr, gw] = packed
        if track_amax != 0:
            scratch = cuda.shared.array(REDUCE_SLOTS, float32)
            m = block_max(m, scratch)
            if tid == 0:
                cuda.atomic.max(amax, 0, m)

    return fp8_encode_transpose_bf16x4


def _make_decode(decode, store):
    def fp8_decode(codes, scale, out):
        s = scale[0]
        i = cuda.grid(1)
        step = cuda.gridsize(1)
        while i < codes.shape[0]:
            out[i] = store(div_rn(decode(codes[i]), s))
            i += step

    return fp8_decode


def _make_encode_transpose(encode, load):
    def fp8_encode_transpose(x, scale, codes, codes_t, amax, track_amax, write_codes):
        """x [R, C] -> codes_t [C, R] (and codes [R, C] when write_codes), one 32x32 tile per block of 256 threads
        (8 rows per pass)."""
        tile = cuda.shared.array((TILE, TILE_PAD), float32)
        tid = cuda.threadIdx.x
        tx = tid % TILE
        ty = tid // TILE
        row0 = cuda.blockIdx.y * TILE
        col0 = cuda.blockIdx.x * TILE
        m = float32(0.0)
        s = scale[0]
        for j in range(0, TILE, THREADS // TILE):
            r = row0 + ty + j
            c = col0 + tx
            v = float32(0.0)
            if r < x.shape[0] and c < x.shape[1]:
                v = load(x[r, c])
                if write_codes != 0:
                    codes[r, c] = encode(v, s)
            tile[ty + j, tx] = v
            av = abs(v)
            if av > m:
                m = av
        cuda.syncthreads()
        for j in range(0, TILE, THREADS // TILE):
            r = col0 + ty + j  # output row = input column
            c = row0 + tx
            if r < codes_t.shape[0] and c < codes_t.shape[1]:
                codes_t[r, c] = encode(tile[tx, ty + j], s)
        if track_amax != 0:
            scratch = cuda.shared.array(REDUCE_SLOTS, float32)
            m = block_max(m, scratch)
            if tid == 0:
                cuda.atomic.max(amax, 0, m)

    return fp8_encode_transpose


def _build(make, signature, name, with_load):
    kernels = {}
    for fmt, (encode, decode) in _CODECS.items():
        for dtype, (numba_type, load, store) in ELEMENT_TYPES.items():
            fn = make(encode, load) if with_load else make(decode, store)
            kernels[fmt, dtype] = Kernel(fn, signature.format(t=numba_type), f"{name}[{fmt},{numba_type}]")
    return kernels


_encode = _build(_make_encode, "void({t}[::1], float32[::1], uint8[::1], float32[::1], int32)", "fp8_encode", True)
_decode = _build(_make_decode, "void(uint8[::1], float32[::1], {t}[::1])", "fp8_decode", False)
_encode_transpose = _build(
    _make_encode_transpose,
    "void({t}[:, ::1], float32[::1], uint8[:, ::1], uint8[:, ::1], float32[::1], int32, int32)",
    "fp8_encode_transpose",
    True,
)
_encode_transpose_bf16x4 = {
    fmt: Kernel(_make_encode_transpose_bf16x4(encode),
                "void(int64[:, ::1], float32[::1], int32[:, ::1], int32[:, ::1], float32[::1], int32, int32)",
                f"fp8_encode_transpose_bf16x4[{fmt}]")
    for fmt, (encode, _) in _CODECS.items()
}
_encode_bf16x4 = {
    fmt: Kernel(_make_encode_bf16x4(encode), "void(int64[::1], float32[::1], int32[::1], float32[::1], int32)",
                f"fp8_encode_bf16x4[{fmt}]")
    for fmt, (encode, _) in _CODECS.items()
}


# -------------------------------------------------------------------------------------------------------- launchers
def _scale_tensor(scale, device) -> torch.Tensor:
    """A one-element fp32 tensor on `device` (Python floats are checked: finite and > 0)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"an FP8 scale must have one element, got shape {tuple(scale.shape)}")
        return scale.reshape(1).to(device=device, dtype=torch.float32)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"an FP8 scale must be finite and > 0, got {scale}")
    return torch.full((1,), scale, dtype=torch.float32, device=device)  # a fill, no host copy (graph-capturable)


def _check_input(x: torch.Tensor):
    if x.dtype not in ELEMENT_TYPES:
        raise TypeError(f"FP8 encode takes float32 or bfloat16 tensors, got {x.dtype}")


def _amax_arg(amax_out, device):
    if amax_out is None:
        return torch.zeros(1, dtype=torch.float32, device=device), 0
    if amax_out.dtype != torch.float32 or amax_out.numel() != 1 or not amax_out.is_contiguous():
        raise ValueError("amax_out must be a contiguous fp32 tensor with one element (e.g. history[0, i:i+1])")
    return amax_out.reshape(1), 1


def _grid(n: int, device) -> int:
    return max(1, min(ceil_div(n, THREADS), 16 * sm_count(device)))


def _out_codes(out: torch.Tensor | None, shape, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    if out.dtype != torch.uint8 or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 tensor of shape {tuple(shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    return out


def encode_kernel(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Numba kernel: uint8 codes shaped like x; optionally folds max|x| into amax_out (atomic max)."""
    get_format(fmt)
    _check_input(x)
    flat = x.reshape(-1).contiguous()
    codes = _out_codes(out, x.shape, x.device).view(-1)
    amax, track = _amax_arg(amax_out, x.device)
    n = flat.numel()
    if n and x.dtype == torch.bfloat16 and n % 4 == 0 and flat.data_ptr() % 8 == 0 and codes.data_ptr() % 4 == 0:
        x4, codes4 = flat.view(torch.int64), codes.view(torch.int32)
        _encode_bf16x4[fmt].launch(_grid(n // 4, x.device), THREADS,
                                   (x4, _scale_tensor(scale, x.device), codes4, amax, track))
    elif n:
        _encode[fmt, x.dtype].launch(_grid(n, x.device), THREADS,
                                     (flat, _scale_tensor(scale, x.device), codes, amax, track))
    return codes.view(x.shape)


def decode_kernel(codes: torch.Tensor, scale, fmt: str = "e4m3", dtype: torch.dtype = torch.bfloat16):
    """Numba kernel: value(code) / scale in `dtype` (float32 or bfloat16)."""
    get_format(fmt)
    flat = codes.reshape(-1).contiguous().view(torch.uint8)
    out = torch.empty(flat.shape, dtype=dtype, device=codes.device)
    if dtype not in ELEMENT_TYPES:
        raise TypeError(f"FP8 decode writes float32 or bfloat16, got {dtype}")
    if flat.numel():
        _decode[fmt, dtype].launch(
            _grid(flat.numel(), codes.device), THREADS, (flat, _scale_tensor(scale, codes.device), out)
        )
    return out.view(codes.shape)


def _transpose_launch(x, scale, fmt, amax_out, out, out_t, both: bool):
    get_format(fmt)
    _check_input(x)
    if x.dim() != 2:
        raise ValueError(f"encode_transpose takes a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.contiguous()
    rows, cols = x.shape
    codes_t = _out_codes(out_t, (cols, rows), x.device)
    codes = _out_codes(out, (rows, cols), x.device) if both else codes_t.view(rows, cols)  # unused when not both
    amax, track = _amax_arg(amax_out, x.device)
    words = (x.dtype == torch.bfloat16 and rows % 4 == 0 and cols % 4 == 0 and x.data_ptr() % 8 == 0
             and codes.data_ptr() % 4 == 0 and codes_t.data_ptr() % 4 == 0)
    if x.numel() and words:  # 8-byte loads, 4-byte stores
        grid = (ceil_div(cols, WTILE), ceil_div(rows, WTILE))
        _encode_transpose_bf16x4[fmt].launch(grid, THREADS, (
            x.view(torch.int64), _scale_tensor(scale, x.device), codes.view(torch.int32) if both else
            codes_t.view(torch.int32).view(rows, cols // 4), codes_t.view(torch.int32), amax, track, int(both)))
    elif x.numel():
        grid = (ceil_div(cols, TILE), ceil_div(rows, TILE))
        _encode_transpose[fmt, x.dtype].launch(
            grid, THREADS, (x, _scale_tensor(scale, x.device), codes, codes_t, amax, track, int(both)))
    return codes, codes_t


def encode_transpose_kernel(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Numba kernel: x [R, C] -> codes [C, R] (row-major), i.e. encode(x).T made contiguous, in one pass."""
    return _transpose_launch(x, scale, fmt, amax_out, None, out, both=False)[1]


def encode_both_kernel(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, out_t: torch.Tensor | None = None):
    """Numba kernel: (codes [R, C], codes_t [C, R]) of x [R, C] from one read of x."""
    return _transpose_launch(x, scale, fmt, amax_out, out, out_t, both=True)


# -------------------------------------------------------------------------------------------------------- reference
def _reference_amax(x: torch.Tensor) -> torch.Tensor:
    a = x.detach().float().abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax() if a.numel() else a.new_zeros(())


def reference_encode(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
                     out: torch.Tensor | None = None):
    """torch's cast after saturation; NaN carries the sign of x."""
    f = get_format(fmt)
    _check_input(x)
    s = _scale_tensor(scale, x.device)
    y = (x.float() * s).clamp(-f.max, f.max)
    codes = y.to(f.torch_dtype).view(torch.uint8)
    nan_codes = torch.where(torch.signbit(x), NAN_CODE | 0x80, NAN_CODE).to(torch.uint8)
    codes = torch.where(torch.isnan(x), nan_codes, codes)
    if amax_out is not None:
        amax, _ = _amax_arg(amax_out, x.device)
        amax.copy_(torch.maximum(amax, _reference_amax(x)))
    return codes if out is None else _out_codes(out, x.shape, x.device).copy_(codes)


def reference_decode(codes: torch.Tensor, scale, fmt: str = "e4m3", dtype: torch.dtype = torch.bfloat16):
    f = get_format(fmt)
    s = _scale_tensor(scale, codes.device)
    return (codes.view(torch.uint8).view(f.torch_dtype).float() / s).to(dtype)


def reference_encode_transpose(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
                               out: torch.Tensor | None = None):
    if x.dim() != 2:
        raise ValueError(f"encode_transpose takes a 2-D tensor, got shape {tuple(x.shape)}")
    codes_t = reference_encode(x, scale, fmt, amax_out).t()
    return codes_t.contiguous() if out is None else _out_codes(out, codes_t.shape, x.device).copy_(codes_t)


def reference_encode_both(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
                          out: torch.Tensor | None = None, out_t: torch.Tensor | None = None):
    codes = reference_encode(x, scale, fmt, amax_out, out)
    if x.dim() != 2:
        raise ValueError(f"encode_both takes a 2-D tensor, got shape {tuple(x.shape)}")
    return codes, (codes.t().contiguous() if out_t is None else _out_codes(out_t, codes.t().shape, x.device)
                   .copy_(codes.t()))


# ----------------------------------------------------------------------------------------------------- public API
def encode(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 FP8 codes of saturate(x * scale); CUDA tensors run the Numba kernel, CPU tensors the torch reference."""
    return (encode_kernel if x.is_cuda else reference_encode)(x, scale, fmt, amax_out, out)


def decode(codes: torch.Tensor, scale, fmt: str = "e4m3", dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """value(codes) / scale in `dtype`."""
    return (decode_kernel if codes.is_cuda else reference_decode)(codes, scale, fmt, dtype)


def encode_transpose(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
                     out: torch.Tensor | None = None):
    """codes of x [R, C] laid out as [C, R] (the column-major operand of torch._scaled_mm for the wgrad GEMM)."""
    return (encode_transpose_kernel if x.is_cuda else reference_encode_transpose)(x, scale, fmt, amax_out, out)


def encode_both(x: torch.Tensor, scale, fmt: str = "e4m3", amax_out: torch.Tensor | None = None,
                out: torch.Tensor | None = None, out_t: torch.Tensor | None = None):
    """(codes [R, C], codes_t [C, R]) of x [R, C] in one pass over x: what dgrad and wgrad (or forward and dgrad)
    take from one tensor."""
    return (encode_both_kernel if x.is_cuda else reference_encode_both)(x, scale, fmt, amax_out, out, out_t)


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d fp32 tensor on x's device (surogate.kernels.abs_max when it exists, else torch)."""
    import surogate.kernels as kernels

    op = getattr(kernels, "abs_max", None)
    if op is not None and x.is_cuda and x.dtype in ELEMENT_TYPES:
        return op(x.contiguous())
    return _reference_amax(x)


def scale_from_amax(amax: torch.Tensor, fmt: str = "e4m3", margin: int = 0, previous: torch.Tensor | None = None):
    """fp8_max / (amax * 2^margin) on the device. amax <= 0, NaN or inf keeps `previous` (default 1); an infinite
    scale (tiny amax) is clamped to the largest fp32."""
    f = get_format(fmt)
    amax = amax.float()
    prev = torch.ones_like(amax) if previous is None else previous.float()
    scale = torch.full_like(amax, f.max) / (amax * 2.0**margin)  # one rounding (scalar / tensor would take two)
    scale = torch.where((amax > 0) & torch.isfinite(amax), scale, prev)
    return scale.clamp(max=torch.finfo(torch.float32).max)


def quantize(x: torch.Tensor, fmt: str = "e4m3", margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Just-in-time per-tensor scaling: (codes, scale) with scale = scale_from_amax(max|x|)."""
    scale = scale_from_amax(abs_max(x), fmt, margin)
    return encode(x, scale, fmt), scale


class DelayedScaling:
    """Per-tensor delayed scaling for `n` FP8 quantizers (TransformerEngine's DelayedScaling, amax over the window).

    Quantizer i encodes with `scale[i]` (from earlier steps) and records the current max|x| into
    `amax_history[0, i]` (pass `amax_slot(i)` as encode's amax_out). `update()`, after each optimizer step, sets
    scale = fp8_max / (max over the history window * 2^margin) (a zero, NaN or inf amax keeps the old scale), then
    rolls the history by one row and clears row 0. All on the device: no host syncs, CUDA-graph capturable.
    `updates` counts update() calls on the host: while it is 0 the scales are the initial 1.0, not calibrated.
    """

    def __init__(self, n: int, fmt: str = "e4m3", history_len: int = 1024, margin: int = 0, device="cpu"):
        if history_len < 1:
            raise ValueError(f"amax history length must be >= 1, got {history_len}")
        self.fmt = get_format(fmt).name
        self.margin = margin
        self.amax_history = torch.zeros(history_len, n, dtype=torch.float32, device=device)
        self.scale = torch.ones(n, dtype=torch.float32, device=device)
        self.scale_inv = torch.ones(n, dtype=torch.float32, device=device)
        self.updates = 0

    def amax_slot(self, i: int) -> torch.Tensor:
        return self.amax_history[0, i : i + 1]

    def scale_slot(self, i: int) -> torch.Tensor:
        return self.scale[i : i + 1]

    def scale_inv_slot(self, i: int) -> torch.Tensor:
        return self.scale_inv[i : i + 1]

    @torch.no_grad()
    def update(self):
        amax = self.amax_history.amax(0)
        self.scale.copy_(scale_from_amax(amax, self.fmt, self.margin, previous=self.scale))
        torch.reciprocal(self.scale, out=self.scale_inv)
        self.amax_history.copy_(torch.roll(self.amax_history, 1, 0))
        self.amax_history[0].zero_()
        self.updates += 1

    def state_dict(self) -> dict:
        return {"amax_history": self.amax_history, "scale": self.scale, "scale_inv": self.scale_inv}

    def load_state_dict(self, state: dict):
        for key in ("amax_history", "scale", "scale_inv"):
            if state[key].shape != getattr(self, key).shape:
                raise ValueError(
                    f"FP8 scaling state: {key} has shape {tuple(state[key].shape)}, this run needs "
                    f"{tuple(getattr(self, key).shape)} (same amax history length and number of layers?)"
                )
            getattr(self, key).copy_(state[key])
        self.updates = max(self.updates, 1)  # saved after an optimizer step: calibrated scales
