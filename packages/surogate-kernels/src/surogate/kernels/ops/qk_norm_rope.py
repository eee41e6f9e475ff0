"""Qwen3's per-head RMSNorm of q and k fused with RoPE, in place on the packed qkv buffer.

qkv is [tokens, (n_q + 2 * n_kv) * head_dim] (q heads, k heads, v heads). For each of the first n_q + n_kv heads x
(length d = head_dim): rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w with w = q_weight for q heads and k_weight
for k heads (both [d], shared by all heads of their kind), then y is rotated as in ops/rope.py (HF rotate_half
convention, angle = position * inv_freq[j] in fp32). v is untouched. rstd is saved fp32 [tokens, n_q + n_kv].
The forward overwrites its input: the backward needs the pre-norm q and k, so callers keep a copy of qkv (or
recompute it).

Backward, per head, with dout the gradient of the rotated output: g = the inverse rotation of dout (the gradient of
y), dx = rstd * (w*g - x * rstd^2 * mean(w*g*x)) written over dout's q/k columns IN PLACE (v's gradient passes
through), and dq_weight / dk_weight = sum over tokens and heads of g * x * rstd, reduced deterministically: per-block
fp32 partial sums (a fixed order inside the block), then rms_norm's column reduction.

Numerics: fp32 throughout, bf16 or fp32 in and out, rounded once (the unfused Qwen3 code rounds after the norm and
again after the rotation); sin/cos by rope.sin_cos.
Shapes: any tokens; head_dim even and <= 256; any head counts. One block per token (blocks loop over tokens): the
block computes the token's d/2 cos/sin values into shared memory, then `group` lanes of a warp take one head (a
group of G lanes, G = the power of two covering the d/2 / P word pairs, at most 32), each lane holding its words of
x1 = x[:d/2] and x2 = x[d/2:] in registers, so each head is read once and written once; the sum of squares is
reduced across the group with shuffles. Values travel as 8-byte words (4 bf16 / 2 fp32) when d/2 is a multiple of
4 / 2 and all tensors are 8-byte aligned, else one value per load.
"""

from __future__ import annotations

import math

import torch
from numba import cuda, float32

from .._packed import as_words, kernels_per_codec, per_word
from .._runtime import REDUCE_SLOTS, dispatch, element_type, lane_group_sum, sm_count
from . import rope as _rope_module
from .rms_norm import column_sum
from .rope import sin_cos

MAX_HEAD_DIM = 256
MAX_HALF = MAX_HEAD_DIM // 2
VALUES_PER_LANE = 4  # of x1 (and as many of x2) a lane holds: head_dim <= 2 * 32 * VALUES_PER_LANE
MAX_WARPS = 8
FORWARD_HEADS_PER_STEP = 2  # heads a lane group loads before it reduces: more loads in flight (the backward: 1)
MIN_BLOCKS = {"forward": 4, "backward": 3}  # blocks of 256 an SM holds: register caps of 64 and 85
WEIGHT_COLUMNS = 2 * MAX_HEAD_DIM  # q_weight then k_weight: one shared fp32 row of dweight sums


def _words_per_lane(p: int) -> int:
    return VALUES_PER_LANE // p


# ---------------------------------------------------------------------------------------------------- kernels
def _make_forward(codec):
    P = codec.per_word
    WPL = _words_per_lane(P)
    S = FORWARD_HEADS_PER_STEP
    XS = S * VALUES_PER_LANE
    unpack, pack = codec.unpack, codec.pack

    def qk_norm_rope_fwd(qkv, q_w, k_w, pos, inv_freq, rstd, n_q, n_heads, half_words, group, eps):
        """qkv [tokens, width / P], q_w and k_w [head_dim / P]: words. The lanes tid // group of the block take
        heads h0 + tid // group + u * heads_per_round for u < S; lane tid % group holds the word pairs
        (wi, wi + half_words) of each, for wi = lane + m * group."""
        tid = cuda.threadIdx.x
        slot = tid // group
        lane = tid - slot * group
        heads_per_round = cuda.blockDim.x // group
        half = half_words * P
        head_words = 2 * half_words
        cs = cuda.shared.array(MAX_HALF, float32)
        sn = cuda.shared.array(MAX_HALF, float32)
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        x1s = cuda.local.array(XS, float32)
        x2s = cuda.local.array(XS, float32)
        sums = cuda.local.array(S, float32)
        o1 = cuda.local.array(P, float32)
        o2 = cuda.local.array(P, float32)
        t = cuda.blockIdx.x
        while t < qkv.shape[0]:  # while loops: `range` with a runtime step costs a 64-bit division and registers
            p = float32(pos[t])
            j = tid
            while j < half:
                sin_a, cos_a = sin_cos(p * inv_freq[j])
                cs[j] = cos_a
                sn[j] = sin_a
                j += cuda.blockDim.x
            cuda.syncthreads()
            h0 = 0
            while h0 < n_heads:  # the same number of rounds for every thread: lane_group_sum needs all of them
                # all loads of the step's S heads first (S * 2 * WPL words in flight a lane), then their norms
                for u in range(S):
                    h = h0 + slot + u * heads_per_round
                    base = h * head_words
                    sum_sq = float32(0.0)
                    for m in range(WPL):
                        wi = lane + m * group
                        if h < n_heads and wi < half_words:
                            a = qkv[t, base + wi]
                            b = qkv[t, base + half_words + wi]
                            for j in range(P):
                                x1 = unpack(a, j)
                                x2 = unpack(b, j)
                                x1s[(u * WPL + m) * P + j] = x1
                                x2s[(u * WPL + m) * P + j] = x2
                                sum_sq += x1 * x1 + x2 * x2
                    sums[u] = sum_sq
                for u in range(S):
                    h = h0 + slot + u * heads_per_round
                    base = h * head_words
                    total = lane_group_sum(sums[u], group, scratch)
                    r = float32(1.0) / math.sqrt(total / float32(2 * half) + eps)
                    if h < n_heads:
                        if lane == 0:
                            rstd[t, h] = r
                        for m in range(WPL):
                            wi = lane + m * group
                            if wi < half_words:
                                if h < n_q:
                                    wa = q_w[wi]
                                    wb = q_w[half_words + wi]
                                else:
                                    wa = k_w[wi]
                                    wb = k_w[half_words + wi]
                                for j in range(P):
                                    y1 = x1s[(u * WPL + m) * P + j] * r * unpack(wa, j)
                                    y2 = x2s[(u * WPL + m) * P + j] * r * unpack(wb, j)
                                    c = cs[wi * P + j]
                                    s = sn[wi * P + j]
                                    o1[j] = y1 * c - y2 * s
                                    o2[j] = y2 * c + y1 * s
                                qkv[t, base + wi] = pack(o1, 0)
                                qkv[t, base + half_words + wi] = pack(o2, 0)
                h0 += S * heads_per_round
            cuda.syncthreads()  # all reads of cs/sn done before the next token overwrites them
            t += cuda.gridDim.x

    return qk_norm_rope_fwd


def _make_backward(codec):
    P = codec.per_word
    WPL = _words_per_lane(P)
    unpack, pack = codec.unpack, codec.pack

    def qk_norm_rope_bwd(d_qkv, qkv, q_w, k_w, rstd, pos, inv_freq, partial, n_q, n_heads, half_words, group):
        """d_qkv (in place), qkv (pre-norm) [tokens, width / P], q_w, k_w [head_dim / P]: words.
        partial: fp32 [gridDim.x, 2 * head_dim], this block's sums for dq_weight (columns [0, d)) and dk_weight."""
        tid = cuda.threadIdx.x
        slot = tid // group
        lane = tid - slot * group
        heads_per_round = cuda.blockDim.x // group
        half = half_words * P
        head_dim = 2 * half
        head_words = 2 * half_words
        cs = cuda.shared.array(MAX_HALF, float32)
        sn = cuda.shared.array(MAX_HALF, float32)
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        x1s = cuda.local.array(VALUES_PER_LANE, float32)
        x2s = cuda.local.array(VALUES_PER_LANE, float32)
        wg1s = cuda.local.array(VALUES_PER_LANE, float32)
        wg2s = cuda.local.array(VALUES_PER_LANE, float32)
        dq1 = cuda.local.array(VALUES_PER_LANE, float32)  # this lane's sums of g * x * rstd for q_weight, k_weight
        dq2 = cuda.local.array(VALUES_PER_LANE, float32)
        dk1 = cuda.local.array(VALUES_PER_LANE, float32)
        dk2 = cuda.local.array(VALUES_PER_LANE, float32)
        o1 = cuda.local.array(P, float32)
        o2 = cuda.local.array(P, float32)
        for k in range(VALUES_PER_LANE):
            dq1[k] = float32(0.0)
            dq2[k] = float32(0.0)
            dk1[k] = float32(0.0)
            dk2[k] = float32(0.0)
        t = cuda.blockIdx.x
        while t < qkv.shape[0]:
            p = float32(pos[t])
            j = tid
            while j < half:
                sin_a, cos_a = sin_cos(p * inv_freq[j])
                cs[j] = cos_a
                sn[j] = sin_a
                j += cuda.blockDim.x
            cuda.syncthreads()
            h0 = 0
            while h0 < n_heads:
                h = h0 + slot
                active = h < n_heads
                is_q = h < n_q
                base = h * head_words
                r = rstd[t, h] if active else float32(0.0)
                dot = float32(0.0)
                for m in range(WPL):
                    wi = lane + m * group
                    if active and wi < half_words:
                        da = d_qkv[t, base + wi]
                        db = d_qkv[t, base + half_words + wi]
                        xa = qkv[t, base + wi]
                        xb = qkv[t, base + half_words + wi]
                        if is_q:
                            wa = q_w[wi]
                            wb = q_w[half_words + wi]
                        else:
                            wa = k_w[wi]
                            wb = k_w[half_words + wi]
                        for j in range(P):
                            c = cs[wi * P + j]
                            s = sn[wi * P + j]
                            d1 = unpack(da, j)
                            d2 = unpack(db, j)
                            g1 = d1 * c + d2 * s  # the inverse rotation: the gradient of y
                            g2 = d2 * c - d1 * s
                            x1 = unpack(xa, j)
                            x2 = unpack(xb, j)
                            wg1 = g1 * unpack(wa, j)
                            wg2 = g2 * unpack(wb, j)
                            dot += wg1 * x1 + wg2 * x2
                            k = m * P + j
                            if is_q:
                                dq1[k] += g1 * x1 * r
                                dq2[k] += g2 * x2 * r
                            else:
                                dk1[k] += g1 * x1 * r
                                dk2[k] += g2 * x2 * r
                            x1s[k] = x1
                            x2s[k] = x2
                            wg1s[k] = wg1
                            wg2s[k] = wg2
                coef = lane_group_sum(dot, group, scratch) * r * r * r / float32(head_dim)
                if active:
                    for m in range(WPL):
                        wi = lane + m * group
                        if wi < half_words:
                            for j in range(P):
                                k = m * P + j
                                o1[j] = r * wg1s[k] - x1s[k] * coef
                                o2[j] = r * wg2s[k] - x2s[k] * coef
                            d_qkv[t, base + wi] = pack(o1, 0)
                            d_qkv[t, base + half_words + wi] = pack(o2, 0)
                h0 += heads_per_round
            cuda.syncthreads()
            t += cuda.gridDim.x
        # The block's dweight sums: slot after slot adds its lanes' sums into shared memory (a fixed order).
        sums = cuda.shared.array(WEIGHT_COLUMNS, float32)
        col = tid
        while col < 2 * head_dim:
            sums[col] = float32(0.0)
            col += cuda.blockDim.x
        cuda.syncthreads()
        for owner in range(heads_per_round):
            if slot == owner:
                for m in range(WPL):
                    wi = lane + m * group
                    if wi < half_words:
                        for j in range(P):
                            k = m * P + j
                            col = wi * P + j
                            sums[col] += dq1[k]
                            sums[half + col] += dq2[k]
                            sums[head_dim + col] += dk1[k]
                            sums[head_dim + half + col] += dk2[k]
            cuda.syncthreads()
        col = tid
        while col < 2 * head_dim:
            partial[cuda.blockIdx.x, col] = sums[col]
            col += cuda.blockDim.x

    return qk_norm_rope_bwd


_forward = kernels_per_codec(
    _make_forward,
    "void({w}[:, ::1], {w}[::1], {w}[::1], int32[::1], float32[::1], float32[:, ::1], int32, int32, int32, int32, "
    "float32)",
    "qk_norm_rope_fwd",
    launch_bounds=(MAX_WARPS * 32, MIN_BLOCKS["forward"]),
)
_backward = kernels_per_codec(
    _make_backward,
    "void({w}[:, ::1], {w}[:, ::1], {w}[::1], {w}[::1], float32[:, ::1], int32[::1], float32[::1], float32[:, ::1], "
    "int32, int32, int32, int32)",
    "qk_norm_rope_bwd",
    launch_bounds=(MAX_WARPS * 32, MIN_BLOCKS["backward"]),
)


# ---------------------------------------------------------------------------------------------------- launchers
def _check(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim) -> int:
    """Validates the arguments; returns the number of tokens."""
    tokens = _rope_module._check(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"qk_norm_rope supports head_dim up to {MAX_HEAD_DIM}, got {head_dim}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,) or w.dtype != qkv.dtype or w.device != qkv.device:
            raise ValueError(
                f"{name} must be [{head_dim}] of {qkv.dtype} on {qkv.device} (the per-head norm weight shared by "
                f"all heads), got {tuple(w.shape)} of {w.dtype} on {w.device}"
            )
    return tokens


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _layout(half_words: int, n_heads: int, heads_per_step: int) -> tuple[int, int]:
    """(lanes per head, threads per block): the fewest warps that take all heads in the fewest rounds."""
    group = min(32, _next_power_of_two(half_words))
    heads_per_warp = 32 // group * heads_per_step
    rounds = -(-n_heads // (MAX_WARPS * heads_per_warp))
    warps = -(-n_heads // (rounds * heads_per_warp))
    return group, 32 * warps


def forward(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int, head_dim: int,
            eps: float):
    """Numba kernel. Norms and rotates the q and k heads of qkv in place.
    Returns (qkv, rstd fp32 [tokens, n_q + n_kv])."""
    tokens = _check(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)
    n_heads = n_q_heads + n_kv_heads
    rstd = torch.empty(tokens, n_heads, dtype=torch.float32, device=qkv.device)
    if tokens == 0 or n_heads == 0:
        return qkv, rstd
    element_type(qkv.dtype)
    rows = qkv.view(tokens, -1)
    half = head_dim // 2
    p = min(per_word(t, half) for t in (rows, q_weight, k_weight))
    group, threads = _layout(half // p, n_heads, FORWARD_HEADS_PER_STEP)
    blocks = min(tokens, sm_count(qkv.device) * max(1, 2048 // threads))
    pos = position_ids.reshape(-1).to(torch.int32).contiguous()
    args = (as_words(rows, p), as_words(q_weight, p), as_words(k_weight, p), pos, inv_freq, rstd, n_q_heads, n_heads,
            half // p, group, eps)
    _forward[qkv.dtype, p].launch(blocks, threads, args)
    return qkv, rstd


def backward(d_qkv, qkv, q_weight, k_weight, rstd, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int,
             head_dim: int):
    """Numba kernel. d_qkv: gradient of the forward's output, overwritten (q/k columns) with the gradient of its
    input; qkv: the forward's input (pre-norm). Returns (d_qkv, dq_weight, dk_weight)."""
    tokens = _check(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)
    _rope_module._check(d_qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)
    n_heads = n_q_heads + n_kv_heads
    if d_qkv.shape != qkv.shape or d_qkv.dtype != qkv.dtype:
        raise ValueError(f"d_qkv must be {tuple(qkv.shape)} of {qkv.dtype}, got {tuple(d_qkv.shape)} of {d_qkv.dtype}")
    if rstd.shape != (tokens, n_heads) or rstd.dtype != torch.float32:
        raise ValueError(f"rstd must be fp32 [{tokens}, {n_heads}] (from the forward), got {tuple(rstd.shape)} "
                         f"of {rstd.dtype}")
    d_weights = torch.empty(2 * head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0 or n_heads == 0:
        d_weights.zero_()
        return d_qkv, d_weights[:head_dim], d_weights[head_dim:]
    element_type(qkv.dtype)
    rows = qkv.view(tokens, -1)
    d_rows = d_qkv.view(tokens, -1)
    half = head_dim // 2
    p = min(per_word(t, half) for t in (rows, d_rows, q_weight, k_weight))
    group, threads = _layout(half // p, n_heads, 1)
    blocks = min(tokens, sm_count(qkv.device) * MIN_BLOCKS["backward"])
    partial = torch.empty(blocks, 2 * head_dim, dtype=torch.float32, device=qkv.device)
    pos = position_ids.reshape(-1).to(torch.int32).contiguous()
    args = (as_words(d_rows, p), as_words(rows, p), as_words(q_weight, p), as_words(k_weight, p), rstd.contiguous(),
            pos, inv_freq, partial, n_q_heads, n_heads, half // p, group)
    _backward[qkv.dtype, p].launch(blocks, threads, args)
    column_sum(partial, d_weights)
    return d_qkv, d_weights[:head_dim], d_weights[head_dim:]


# ---------------------------------------------------------------------------------------------------- reference
def _reference_heads(qkv, q_weight, k_weight, n_q_heads, n_kv_heads, head_dim):
    """(the q and k heads of qkv as a view [tokens, n_q + n_kv, d], their weights [n_q + n_kv, d] in compute dtype)."""
    compute = torch.promote_types(qkv.dtype, torch.float32)
    tokens = qkv.numel() // qkv.shape[-1]
    heads = qkv.view(tokens, n_q_heads + 2 * n_kv_heads, head_dim)[:, : n_q_heads + n_kv_heads]
    w = torch.cat([q_weight.to(compute).expand(n_q_heads, head_dim), k_weight.to(compute).expand(n_kv_heads, head_dim)])
    return heads, w, compute


def reference_forward(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int,
                      head_dim: int, eps: float):
    """Plain torch math in fp32 (fp64 for fp64 inputs; the angle is fp32 either way), written back in place."""
    _check(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)
    heads, w, compute = _reference_heads(qkv, q_weight, k_weight, n_q_heads, n_kv_heads, head_dim)
    x = heads.to(compute)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    heads.copy_(_rope_module.reference_rotate(x * rstd * w, position_ids, inv_freq))
    return qkv, rstd.squeeze(-1).to(torch.promote_types(rstd.dtype, torch.float32))


def reference_backward(d_qkv, qkv, q_weight, k_weight, rstd, position_ids, inv_freq, n_q_heads: int,
                       n_kv_heads: int, head_dim: int):
    _check(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)
    heads, w, compute = _reference_heads(qkv, q_weight, k_weight, n_q_heads, n_kv_heads, head_dim)
    d_heads = _reference_heads(d_qkv, q_weight, k_weight, n_q_heads, n_kv_heads, head_dim)[0]
    x = heads.to(compute)
    r = rstd.to(compute).unsqueeze(-1)
    g = _rope_module.reference_rotate(d_heads.to(compute), position_ids, inv_freq, -1.0)
    wg = w * g
    d_heads.copy_(r * (wg - x * r * r * (wg * x).mean(-1, keepdim=True)))
    dw = (g * x * r).sum(0)
    return d_qkv, dw[:n_q_heads].sum(0).to(q_weight.dtype), dw[n_q_heads:].sum(0).to(k_weight.dtype)


qk_norm_rope_forward = dispatch(forward, reference_forward)
qk_norm_rope_backward = dispatch(backward, reference_backward)
