"""Rotary position embedding (RoPE), in place on the packed qkv buffer, HF "rotate_half" (non-interleaved) convention.

qkv is [tokens, (n_q + 2 * n_kv) * head_dim]: q heads, then k heads, then v heads. The first n_q + n_kv heads are
rotated, v is untouched. Per head, with d = head_dim, x1 = x[:d/2], x2 = x[d/2:] and j < d/2:
    angle = position * inv_freq[j]   (fp32, as HF: position_ids.float() * inv_freq)
    out1 = x1 * cos(angle) - x2 * sin(angle),   out2 = x2 * cos(angle) + x1 * sin(angle)
The backward applies the inverse (transposed) rotation, i.e. the same with -sin, in place on the gradient.
rope_inv_freq builds inv_freq as HF does: 1 / theta^(2j/d) in fp32, optionally rescaled by rope_scaling
("linear": / factor; "llama3": Llama 3.1's wavelength-dependent scaling).

Numerics: sin and cos of the fp32 angle by `sin_cos`: the angle reduced modulo pi/2 in fp64 (exact enough for any
position below 2^24), then fp32 minimax polynomials on [-pi/4, pi/4] (~1 ulp). Not libdevice's sinf/cosf: their
Payne-Hanek path for huge angles keeps an array in local memory; not the fast intrinsics: their error grows with the
angle, which reaches the position. The rotation in fp32; bf16 or fp32 in and out, rounded once. (HF rounds cos/sin to
bf16 for bf16 models; this is the more accurate of the two.)
Shapes: any number of tokens, head_dim even and <= 2 * MAX_HALF, any head counts. One block per token (blocks loop
over tokens): the block's threads compute the token's d/2 cos/sin values once into shared memory, then each thread
rotates pairs (x1, x2) of one column position across several heads; values travel as 8-byte words (4 bf16 / 2 fp32)
when d/2 is a multiple of 4 / 2 and qkv is 8-byte aligned, else one value per load. Position ids: int32 in the kernel
(int64 is converted once per call; pass int32 to skip that copy).
"""

from __future__ import annotations

import math

import torch
from numba import cuda, float32, float64, int32, int64, types

from .._packed import as_words, kernels_per_codec, per_word
from .._runtime import device_function, dispatch, element_type, sm_count

MAX_HALF = 256  # head_dim <= 512
THREADS = 256
MIN_BLOCKS = 4  # 4 x 256 threads an SM (<= 64 registers: the 64-bit index arithmetic needs them, 32 spilled)
HEADS_PER_STEP = 4  # heads whose words a thread loads before it rotates and stores them: up to 64 bytes in flight

TWO_OVER_PI = 0.6366197723675814
PI_OVER_2_HI = 1.5707963267948966  # pi/2 = HI + LO in fp64
PI_OVER_2_LO = 6.123233995736766e-17


# ---------------------------------------------------------------------------------------------------- kernels
@device_function
def sin_cos(angle):
    """(sin, cos) of an fp32 angle, ~1 ulp: angle = k * pi/2 + x with x in [-pi/4, pi/4] (reduced in fp64), then
    Cephes' fp32 minimax polynomials for sin x and cos x, and the quadrant k mod 4 picks signs and order.
    Shared with qk_norm_rope."""
    a = float64(angle)
    k = math.floor(a * TWO_OVER_PI + 0.5)
    x = float32((a - k * PI_OVER_2_HI) - k * PI_OVER_2_LO)
    z = x * x
    s = ((float32(-1.9515295891e-4) * z + float32(8.3321608736e-3)) * z - float32(1.6666654611e-1)) * z * x + x
    c = (
        ((float32(2.443315711809948e-5) * z - float32(1.388731625493765e-3)) * z + float32(4.166664568298827e-2))
        * z
        * z
        - float32(0.5) * z
        + float32(1.0)
    )
    quadrant = int32(int64(k) & 3)
    if quadrant == 0:
        return s, c
    if quadrant == 1:
        return c, -s
    if quadrant == 2:
        return -s, -c
    return -c, s


def _make_rope(codec):
    P = codec.per_word
    unpack, pack = codec.unpack, codec.pack
    word = getattr(types, codec.word)

    def rope(qkv, pos, inv_freq, n_heads, half_words, sign):
        """qkv: [tokens, width / P] words; rotates heads [0, n_heads); half_words = head_dim / 2 / P; sign = +1 for
        the forward, -1 for the backward. blockDim.x = groups * half_words: thread (group, w) handles word w of the
        first half of heads group, group + groups, ..."""
        tid = cuda.threadIdx.x
        groups = cuda.blockDim.x // half_words
        group = tid // half_words
        wi = tid - group * half_words
        half = half_words * P
        head_words = 2 * half_words
        cs = cuda.shared.array(MAX_HALF, float32)
        sn = cuda.shared.array(MAX_HALF, float32)
        w1 = cuda.local.array(HEADS_PER_STEP, word)
        w2 = cuda.local.array(HEADS_PER_STEP, word)
        o1 = cuda.local.array(P, float32)
        o2 = cuda.local.array(P, float32)
        t = cuda.blockIdx.x
        while t < qkv.shape[0]:  # while loops: `range` with a runtime step costs a 64-bit division and registers
            p = float32(pos[t])
            j = tid
            while j < half:
                sin_a, cos_a = sin_cos(p * inv_freq[j])
                cs[j] = cos_a
                sn[j] = sin_a * sign
                j += cuda.blockDim.x
            cuda.syncthreads()
            h0 = group
            while h0 < n_heads:
                for u in range(HEADS_PER_STEP):
                    h = h0 + u * groups
                    if h < n_heads:
                        w1[u] = qkv[t, h * head_words + wi]
                        w2[u] = qkv[t, h * head_words + half_words + wi]
                for u in range(HEADS_PER_STEP):
                    h = h0 + u * groups
                    if h < n_heads:
                        for j in range(P):
                            c = cs[wi * P + j]
                            s = sn[wi * P + j]
                            x1 = unpack(w1[u], j)
                            x2 = unpack(w2[u], j)
                            o1[j] = x1 * c - x2 * s
                            o2[j] = x2 * c + x1 * s
                        qkv[t, h * head_words + wi] = pack(o1, 0)
                        qkv[t, h * head_words + half_words + wi] = pack(o2, 0)
                h0 += groups * HEADS_PER_STEP
            cuda.syncthreads()  # all reads of cs/sn done before the next token overwrites them
            t += cuda.gridDim.x

    return rope


_rope = kernels_per_codec(
    _make_rope,
    "void({w}[:, ::1], int32[::1], float32[::1], int32, int32, float32)",
    "rope",
    launch_bounds=(THREADS, MIN_BLOCKS),
)


# ---------------------------------------------------------------------------------------------------- inv_freq
def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """fp32 [head_dim // 2] inverse frequencies, as HF transformers computes them (same fp32 operations, so the same
    bits). rope_scaling: None, or a config's rope_scaling / rope_parameters dict with "rope_type" (or the older
    "type"): "default", "linear" (factor) or "llama3" (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if not rope_scaling:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq

    def key(name):
        if name not in rope_scaling:
            raise ValueError(f"rope_scaling of rope_type {rope_type!r} needs the key {name!r}; got {rope_scaling}")
        return rope_scaling[name]

    if rope_type == "linear":
        return inv_freq / key("factor")
    if rope_type == "llama3":
        factor = key("factor")
        low_freq_factor = key("low_freq_factor")
        high_freq_factor = key("high_freq_factor")
        old_context = key("original_max_position_embeddings")
        # wavelengths longer than old_context / low_freq_factor are divided by factor, shorter than
        # old_context / high_freq_factor kept, and the band between interpolated smoothly
        wavelen = 2 * math.pi / inv_freq
        long = wavelen > old_context / low_freq_factor
        short = wavelen < old_context / high_freq_factor
        scaled = torch.where(long, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        return torch.where(~long & ~short, smoothed, scaled)
    raise ValueError(
        f"rope_scaling rope_type {rope_type!r} is not supported (supported: default, linear, llama3); "
        f"remove rope_scaling from the model's config.json or use a model with a supported RoPE"
    )


# ---------------------------------------------------------------------------------------------------- launchers
def _check(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim) -> int:
    """Validates the arguments; returns the number of tokens."""
    if qkv.is_cuda:
        element_type(qkv.dtype)  # raises for dtypes the kernels lack
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    width = (n_q_heads + 2 * n_kv_heads) * head_dim
    if qkv.dim() < 1 or qkv.shape[-1] != width:
        raise ValueError(
            f"qkv must be [tokens, (n_q_heads + 2 * n_kv_heads) * head_dim] = [tokens, {width}] "
            f"(n_q_heads={n_q_heads}, n_kv_heads={n_kv_heads}, head_dim={head_dim}), got {tuple(qkv.shape)}"
        )
    if not qkv.is_contiguous():
        raise ValueError("qkv must be contiguous: RoPE rotates it in place (call .contiguous() and use the result)")
    tokens = qkv.numel() // width
    if position_ids.numel() != tokens or position_ids.dtype.is_floating_point:
        raise ValueError(
            f"position_ids must hold one integer per token ({tokens}), got {tuple(position_ids.shape)} "
            f"of {position_ids.dtype}"
        )
    if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(
            f"inv_freq must be fp32 [{head_dim // 2}] (rope_inv_freq(head_dim, theta)), got "
            f"{tuple(inv_freq.shape)} of {inv_freq.dtype}"
        )
    if position_ids.device != qkv.device or inv_freq.device != qkv.device:
        raise ValueError(
            f"qkv ({qkv.device}), position_ids ({position_ids.device}) and inv_freq ({inv_freq.device}) must be on "
            f"the same device: move inv_freq there once (e.g. a module buffer)"
        )
    return tokens


def _launch(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, sign):
    tokens = _check(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)
    half = head_dim // 2
    if half > MAX_HALF:
        raise ValueError(f"RoPE supports head_dim up to {2 * MAX_HALF}, got {head_dim}")
    n_heads = n_q_heads + n_kv_heads
    if tokens == 0 or n_heads == 0:
        return qkv
    rows = qkv.view(tokens, -1)
    p = per_word(rows, half)
    half_words = half // p
    groups = max(1, min(n_heads, THREADS // half_words))  # a block rotates `groups` heads at a time
    threads = groups * half_words
    blocks = min(tokens, sm_count(qkv.device) * max(1, 2048 // threads))
    pos = position_ids.reshape(-1).to(torch.int32).contiguous()
    _rope[qkv.dtype, p].launch(blocks, threads, (as_words(rows, p), pos, inv_freq, n_heads, half_words, sign))
    return qkv


def forward(qkv, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Numba kernel. Rotates the q and k heads of qkv in place; returns qkv."""
    return _launch(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, 1.0)


def backward(d_qkv, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Numba kernel. Rotates the q and k gradients back in place (v's gradient passes through); returns d_qkv."""
    return _launch(d_qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, -1.0)


# ---------------------------------------------------------------------------------------------------- reference
def reference_rotate(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, sign: float = 1.0):
    """x [tokens, heads, head_dim] rotated (sign -1: the inverse rotation), in x's dtype; the angle in fp32."""
    angle = position_ids.reshape(-1, 1).to(torch.float32) * inv_freq.reshape(1, -1)
    cos = angle.to(x.dtype).cos().unsqueeze(1)
    sin = angle.to(x.dtype).sin().unsqueeze(1) * sign
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _reference(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, sign):
    """Plain torch math in fp32 (fp64 for fp64 qkv; the angle is fp32 either way), written back in place."""
    tokens = _check(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)
    compute = torch.promote_types(qkv.dtype, torch.float32)
    heads = qkv.view(tokens, n_q_heads + 2 * n_kv_heads, head_dim)[:, : n_q_heads + n_kv_heads]
    heads.copy_(reference_rotate(heads.to(compute), position_ids, inv_freq, sign))
    return qkv


def reference_forward(qkv, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    return _reference(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, 1.0)


def reference_backward(d_qkv, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    return _reference(d_qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, -1.0)


rope_forward = dispatch(forward, reference_forward)
rope_backward = dispatch(backward, reference_backward)
