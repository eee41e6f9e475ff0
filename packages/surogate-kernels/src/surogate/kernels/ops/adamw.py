"""Fused AdamW over flat buffers (one launch per step, whatever the number of tensors), global grad norm, clip scale.

The caller keeps every trainable parameter in one flat fp32 master buffer (and the grads and both moments in flat
buffers of the same length), so one grid-stride launch updates all of them. Weight decay is a scalar per call:
keep decayed and non-decayed parameters (norms, biases) in two flat buffers and call once per group (or pass
weight_decay=0) - no per-element mask.

Math (torch.optim.AdamW, decoupled weight decay), per element, in fp32:
    g = grad * grad_scale;  p *= 1 - lr * weight_decay;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
Bias corrections are computed in fp64 from step t, once per thread. lr and step are floats or 0-d device tensors
(a CUDA-graph-captured optimizer step reads them on the device: no host sync); grad_scale is None, a float or a
0-d device tensor (the clip factor from clip_scale). grads fp32 or bf16; params and moments fp32.
work_params (optional, flat bf16) receives the new master weights rounded to nearest even, or with stochastic
rounding: a counter-based hash (murmur3 fmix32) of (seed, step, element index) gives 16 uniform bits added to the
fp32 bits before truncation to bf16: unbiased, and bitwise reproducible for a given (seed, step).
Memory: 8-byte words (2 values: _packed.py) when the length is even; STEP words of each buffer in flight per thread.

global_grad_norm(flat_grads): sqrt(sum g^2), fp32 accumulation, two deterministic stages (per-block partials in a
grid sized to the SM count, then one block). clip_scale(norm, max_norm) = min(1, max_norm / (norm + 1e-6)) on the
device (torch ops: a one-thread Numba kernel would cost more launch overhead than they do).
"""

from __future__ import annotations

import math

import torch
from numba import cuda, float32, float64, int64, uint64

from .._packed import CODECS, as_words, bits_to_f32, f32_to_bits, kernels_per_codec, per_word
from .._runtime import REDUCE_SLOTS, Kernel, block_sum, ceil_div, device_function, dispatch, round_up, sm_count
from .cross_entropy import scale_arg

STEP = {1: 4, 2: 2}  # words of each buffer a thread loads before computing (values per word -> words)
NORM_STEP = 4  # words per thread in flight in the grad-norm reduction
THREADS = 256
BLOCKS_PER_SM = 4
_M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------- hashing
@device_function
def _mix32(h):
    """murmur3's fmix32 on a 32-bit value held in a uint64."""
    h = h ^ (h >> uint64(16))
    h = (h * uint64(0x85EBCA6B)) & uint64(_M32)
    h = h ^ (h >> uint64(13))
    h = (h * uint64(0xC2B2AE35)) & uint64(_M32)
    return h ^ (h >> uint64(16))


@device_function
def _step_key(seed, step):
    s = uint64(seed)
    return _mix32((s & uint64(_M32)) ^ _mix32((s >> uint64(32)) ^ _mix32(uint64(step) & uint64(_M32))))


@device_function
def _round_stochastic(f, index, key):
    """f rounded to a bf16-representable fp32: 16 random bits added below bf16's last mantissa bit, then truncated."""
    i = uint64(index)
    r = int64(_mix32((i & uint64(_M32)) ^ _mix32(key ^ (i >> uint64(32)))) & uint64(0xFFFF))
    bits = f32_to_bits(f)
    if (bits & 0x7FFFFFFF) > 0x7F800000:  # NaN stays NaN
        return f
    return bits_to_f32(((bits + r) >> 16) << 16)


# ---------------------------------------------------------------------------------------------------- kernels
def _make_adamw(grad_codec):
    P = grad_codec.per_word
    S = STEP[P]
    VALS = S * P
    unpack_f, pack_f = CODECS[torch.float32, P].unpack, CODECS[torch.float32, P].pack
    unpack_g = grad_codec.unpack
    pack_w = CODECS[torch.bfloat16, P].pack

    def adamw(params, grads, exp_avg, exp_avg_sq, work, lr, step, gscale, beta1, beta2, eps, weight_decay, mode,
              seed):
        """All buffers: flat words of P values. mode: 0 no work weights, 1 round to nearest even, 2 stochastic."""
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n = params.shape[0]
        rate = lr[0]
        t = float64(step[0])
        step_size = float32(rate / (1.0 - beta1**t))
        inv_bc2_sqrt = float32(1.0 / math.sqrt(1.0 - beta2**t))
        decay = float32(1.0) - rate * weight_decay
        b1 = float32(beta1)
        b2 = float32(beta2)
        c1 = float32(1.0 - beta1)
        c2 = float32(1.0 - beta2)
        gs = gscale[0]
        key = _step_key(seed, t)
        pv = cuda.local.array(VALS, float32)
        gv = cuda.local.array(VALS, float32)
        mv = cuda.local.array(VALS, float32)
        vv = cuda.local.array(VALS, float32)
        for base in range(cuda.blockIdx.x * nt * S + tid, n, cuda.gridDim.x * nt * S):
            for k in range(S):
                i = base + k * nt
                if i < n:
                    pw = params[i]
                    gw = grads[i]
                    mw = exp_avg[i]
                    vw = exp_avg_sq[i]
                    for j in range(P):
                        pv[k * P + j] = unpack_f(pw, j)
                        gv[k * P + j] = unpack_g(gw, j)
                        mv[k * P + j] = unpack_f(mw, j)
                        vv[k * P + j] = unpack_f(vw, j)
            for k in range(S):
                i = base + k * nt
                if i < n:
                    for j in range(P):
                        q = k * P + j
                        g = gv[q] * gs
                        m = b1 * mv[q] + c1 * g
                        v = b2 * vv[q] + c2 * g * g
                        pv[q] = pv[q] * decay - step_size * m / (math.sqrt(v) * inv_bc2_sqrt + eps)
                        mv[q] = m
                        vv[q] = v
                    params[i] = pack_f(pv, k * P)
                    exp_avg[i] = pack_f(mv, k * P)
                    exp_avg_sq[i] = pack_f(vv, k * P)
                    if mode == 1:
                        work[i] = pack_w(pv, k * P)
                    elif mode == 2:
                        for j in range(P):
                            gv[k * P + j] = _round_stochastic(pv[k * P + j], i * P + j, key)
                        work[i] = pack_w(gv, k * P)

    return adamw


def _make_sum_squares(codec):
    P = codec.per_word
    unpack = codec.unpack
    S = NORM_STEP

    def sum_squares(x, partial):
        """partial[block] = sum of x^2 over this block's grid-stride share, in fp32."""
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n = x.shape[0]
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        acc = float32(0.0)
        for base in range(cuda.blockIdx.x * nt * S + tid, n, cuda.gridDim.x * nt * S):
            for k in range(S):
                i = base + k * nt
                if i < n:
                    w = x[i]
                    for j in range(P):
                        value = unpack(w, j)
                        acc += value * value
        total = block_sum(acc, scratch)
        if tid == 0:
            partial[cuda.blockIdx.x] = total

    return sum_squares


def _norm_of_partials(partial, out):
    """out[0] = sqrt(sum(partial)), one block, fixed order."""
    scratch = cuda.shared.array(REDUCE_SLOTS, float32)
    acc = float32(0.0)
    for i in range(cuda.threadIdx.x, partial.shape[0], cuda.blockDim.x):
        acc += partial[i]
    total = block_sum(acc, scratch)
    if cuda.threadIdx.x == 0:
        out[0] = math.sqrt(total)


_ADAMW_SIGNATURE = (
    "void({f}[::1], {g}[::1], {f}[::1], {f}[::1], {w}[::1], float32[::1], float32[::1], float32[::1], "
    "float64, float64, float32, float32, int32, int64)"
)
_adamw = {
    (dtype, p): Kernel(
        _make_adamw(CODECS[dtype, p]),
        _ADAMW_SIGNATURE.format(
            f=CODECS[torch.float32, p].word, g=CODECS[dtype, p].word, w=CODECS[torch.bfloat16, p].word
        ),
        f"adamw[{str(dtype)[6:]}x{p}]",
    )
    for dtype in (torch.float32, torch.bfloat16)
    for p in (1, 2)
}
_sum_squares = kernels_per_codec(_make_sum_squares, "void({w}[::1], float32[::1])", "grad_sum_squares")
_norm = Kernel(_norm_of_partials, "void(float32[::1], float32[::1])", "grad_norm_finish")


# ---------------------------------------------------------------------------------------------------- launchers
def _check(params, grads, exp_avg, exp_avg_sq, work_params, seed):
    n = params.numel()
    for name, t, dtypes in (("params", params, (torch.float32,)), ("grads", grads, (torch.float32, torch.bfloat16)),
                            ("exp_avg", exp_avg, (torch.float32,)), ("exp_avg_sq", exp_avg_sq, (torch.float32,)),
                            ("work_params", work_params, (torch.bfloat16,))):
        if t is None:
            continue
        if t.dim() != 1 or not t.is_contiguous() or t.numel() != n or t.dtype not in dtypes:
            raise ValueError(
                f"adamw_step: {name} must be a flat contiguous buffer of {n} {' or '.join(map(str, dtypes))} "
                f"values (like params), got shape {tuple(t.shape)} {t.dtype}"
            )
    if not 0 <= seed < 2**63:
        raise ValueError(f"adamw_step: seed must be in [0, 2**63), got {seed}")


def _aligned(t: torch.Tensor, p: int) -> bool:
    return t is None or t.data_ptr() % (p * t.element_size()) == 0


def _words(t: torch.Tensor, p: int) -> torch.Tensor:
    return t if p == 1 else t.view(CODECS[t.dtype, p].torch_word)


def update(params, grads, exp_avg, exp_avg_sq, *, lr, beta1: float, beta2: float, eps: float, weight_decay: float,
           step, grad_scale=None, work_params=None, stochastic_rounding: bool = False, seed: int = 0):
    """Numba kernel: one AdamW step over flat buffers, in place (params, exp_avg, exp_avg_sq, work_params)."""
    _check(params, grads, exp_avg, exp_avg_sq, work_params, seed)
    n = params.numel()
    if n == 0:
        return
    buffers = (params, grads, exp_avg, exp_avg_sq, work_params)
    p = 2 if n % 2 == 0 and all(_aligned(t, 2) for t in buffers) else 1
    device = params.device
    work = work_params if work_params is not None else torch.empty(p, dtype=torch.bfloat16, device=device)
    mode = 0 if work_params is None else 2 if stochastic_rounding else 1
    words = _words(params, p)
    blocks = max(1, min(ceil_div(words.shape[0], THREADS * STEP[p]), BLOCKS_PER_SM * sm_count(device)))
    threads = min(THREADS, max(32, round_up(ceil_div(words.shape[0], STEP[p]), 32)))
    _adamw[grads.dtype, p].launch(
        blocks,
        threads,
        (words, _words(grads, p), _words(exp_avg, p), _words(exp_avg_sq, p), _words(work, p),
         scale_arg(lr, device), scale_arg(step, device), scale_arg(1.0 if grad_scale is None else grad_scale, device),
         float(beta1), float(beta2), float(eps), float(weight_decay), mode, int(seed)),
    )


def _check_norm(flat_grads: torch.Tensor):
    if flat_grads.dtype not in (torch.float32, torch.bfloat16) or flat_grads.dim() != 1:
        raise ValueError(
            f"global_grad_norm takes a flat fp32 or bf16 buffer, got shape {tuple(flat_grads.shape)} {flat_grads.dtype}"
        )


def grad_norm(flat_grads: torch.Tensor) -> torch.Tensor:
    """Numba kernels: L2 norm of a flat fp32 / bf16 buffer as a 0-d fp32 device tensor."""
    _check_norm(flat_grads)
    flat = flat_grads.contiguous()
    p = per_word(flat, flat.numel())
    words = as_words(flat, p)
    step = NORM_STEP
    blocks = max(1, min(ceil_div(words.shape[0], THREADS * step), BLOCKS_PER_SM * sm_count(flat.device)))
    threads = min(THREADS, max(32, round_up(ceil_div(words.shape[0], step), 32)))
    partial = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    out = torch.empty(1, dtype=torch.float32, device=flat.device)
    _sum_squares[flat.dtype, p].launch(blocks, threads, (words, partial))
    _norm.launch(1, min(1024, max(32, round_up(blocks, 32))), (partial, out))
    return out.reshape(())


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)) as a 0-d fp32 tensor on norm's device (no host sync)."""
    norm = torch.as_tensor(norm, dtype=torch.float32)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(torch.float32)


# ---------------------------------------------------------------------------------------------------- reference
def _reference_mulmod32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for 32-bit h in int64 tensors, with every intermediate below 2^49 (no signed overflow)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _reference_mix32(h: torch.Tensor) -> torch.Tensor:
    """fmix32 on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _reference_mulmod32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _reference_mulmod32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def reference_round_stochastic(x: torch.Tensor, step, seed: int) -> torch.Tensor:
    """The kernel's stochastic rounding of a flat fp32 tensor to bf16, in torch integer ops (bitwise equal)."""
    t = torch.as_tensor(step, device=x.device).to(torch.float64).to(torch.int64) & _M32
    key = _reference_mix32((seed & _M32) ^ _reference_mix32((seed >> 32) ^ _reference_mix32(t)))
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    r = _reference_mix32((index & _M32) ^ _reference_mix32(key ^ (index >> 32))) & 0xFFFF
    bits = x.view(torch.int32).to(torch.int64) & _M32
    rounded = (((bits + r) >> 16) << 16) & _M32
    rounded = torch.where((bits & 0x7FFFFFFF) > 0x7F800000, bits, rounded)
    as_int32 = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    return as_int32.view(torch.float32).to(torch.bfloat16)


def reference_update(params, grads, exp_avg, exp_avg_sq, *, lr, beta1: float, beta2: float, eps: float,
                     weight_decay: float, step, grad_scale=None, work_params=None, stochastic_rounding: bool = False,
                     seed: int = 0):
    """Plain torch math, in place: the oracle for tests and the CPU path."""
    _check(params, grads, exp_avg, exp_avg_sq, work_params, seed)
    g = grads.to(params.dtype)
    if grad_scale is not None:
        g = g * grad_scale
    t = step.double() if isinstance(step, torch.Tensor) else float(step)
    bias_correction1 = 1 - beta1**t
    bias_correction2_sqrt = (1 - beta2**t) ** 0.5
    params.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
    params.sub_((lr / bias_correction1) * exp_avg / denom)
    if work_params is not None:
        work_params.copy_(reference_round_stochastic(params, step, seed) if stochastic_rounding else params)


def reference_grad_norm(flat_grads: torch.Tensor) -> torch.Tensor:
    _check_norm(flat_grads)
    return flat_grads.to(torch.float32).pow(2).sum().sqrt()


adamw_step = dispatch(update, reference_update)
global_grad_norm = dispatch(grad_norm, reference_grad_norm)
