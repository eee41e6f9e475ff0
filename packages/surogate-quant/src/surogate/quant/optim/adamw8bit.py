"""8-bit AdamW (bitsandbytes' blockwise optimizer): m and v stored as 8-bit codes on dynamic maps, blocks of 2048.

State of a flat buffer of n parameters: m_codes, v_codes uint8 [n]; m_absmax, v_absmax fp32 [ceil(n / 2048)].
m uses the signed dynamic map, v the unsigned one (dynamic8.py): m = map_s[code] * m_absmax[block].
One step, fused in one kernel pass (one CUDA block of 256 threads per 2048-element block, 8 elements a thread):
  g = grad * grad_scale; if g is NaN or inf the element is skipped (p, m, v keep their values);
  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2                         (fp32)
  p = p (1 - lr wd) - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)   (decoupled decay, as torch.optim.AdamW)
  then the block's new absmax and the codes of m / absmax, v / absmax (dynamic8's nearest-midpoint rule).
Optionally writes bf16 work weights (round to nearest even) from the new fp32 master.
Numerics: fp32 throughout; the kernel contracts multiply-adds into FMAs, the torch reference does not, so they agree
to fp32 rounding and the codes to within one code at midpoints. State memory: 2 bytes + 8 / 2048 bytes a parameter
(fp32 AdamW: 8 bytes).
lr, step and grad_scale may be 0-d device tensors (no host sync: the step can be captured in a CUDA graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from numba import cuda, float32

from surogate.kernels._runtime import ELEMENT_TYPES, REDUCE_SLOTS, Kernel, block_max, ceil_div, f32_to_bf16

from .. import dynamic8

BLOCK = 2048
THREADS = 256
PER_THREAD = BLOCK // THREADS
M_ZERO_CODE = 127  # signed map: 0.0
V_ZERO_CODE = 0  # unsigned map: 0.0
# hyper-parameter vector layout (fp32, on the device)
LR, BETA1, BETA2, EPS, WD, STEP_SIZE, BIAS2_SQRT, GRAD_SCALE = range(8)


@dataclass
class AdamW8bitState:
    m_codes: torch.Tensor
    v_codes: torch.Tensor
    m_absmax: torch.Tensor
    v_absmax: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device="cpu") -> AdamW8bitState:
        blocks = ceil_div(n, BLOCK)
        return cls(
            torch.full((n,), M_ZERO_CODE, dtype=torch.uint8, device=device),
            torch.full((n,), V_ZERO_CODE, dtype=torch.uint8, device=device),
            torch.zeros(blocks, dtype=torch.float32, device=device),
            torch.zeros(blocks, dtype=torch.float32, device=device),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.m_codes, self.v_codes, self.m_absmax, self.v_absmax))

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) in fp32."""
        m = dynamic8.dequantize_blockwise(self.m_codes, self.m_absmax, BLOCK, signed=True)
        v = dynamic8.dequantize_blockwise(self.v_codes, self.v_absmax, BLOCK, signed=False)
        return m, v

    @classmethod
    def quantize(cls, m: torch.Tensor, v: torch.Tensor) -> AdamW8bitState:
        m_codes, m_absmax = dynamic8.quantize_blockwise(m, BLOCK, signed=True)
        v_codes, v_absmax = dynamic8.quantize_blockwise(v, BLOCK, signed=False)
        return cls(m_codes, v_codes, m_absmax, v_absmax)


# ----------------------------------------------------------------------------------------------------------- kernel
def _make_step(load):
    def adamw8bit_step(p, g, m_codes, v_codes, m_absmax, v_absmax, maps, hyper, work, write_work):
        """maps: fp32 [4, 256] = signed map, its midpoints, unsigned map, its midpoints (255 used)."""
        tid = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        n = p.shape[0]
        smaps = cuda.shared.array((4, 256), float32)
        scratch = cuda.shared.array(REDUCE_SLOTS, float32)
        for r in range(4):
            smaps[r, tid] = maps[r, tid]
        cuda.syncthreads()
        lr = hyper[LR]
        b1 = hyper[BETA1]
        b2 = hyper[BETA2]
        eps = hyper[EPS]
        decay = float32(1.0) - lr * hyper[WD]
        step_size = hyper[STEP_SIZE]
        bias2 = hyper[BIAS2_SQRT]
        gscale = hyper[GRAD_SCALE]
        m_scale = m_absmax[blk]
        v_scale = v_absmax[blk]
        ms = cuda.local.array(PER_THREAD, float32)
        vs = cuda.local.array(PER_THREAD, float32)
        m_max = float32(0.0)
        v_max = float32(0.0)
        base = blk * BLOCK + tid
        for k in range(PER_THREAD):
            i = base + k * THREADS
            m = float32(0.0)
            v = float32(0.0)
            if i < n:
                m = smaps[0, m_codes[i]] * m_scale
                v = smaps[2, v_codes[i]] * v_scale
                grad = load(g[i]) * gscale
                w = p[i]
                if not (math.isnan(grad) or math.isinf(grad)):
                    m = b1 * m + (float32(1.0) - b1) * grad
                    v = b2 * v + (float32(1.0) - b2) * grad * grad
                    w = w * decay - step_size * m / (math.sqrt(v) / bias2 + eps)
                    p[i] = w
                if write_work != 0:
                    work[i] = f32_to_bf16(w)
            ms[k] = m
            vs[k] = v
            m_max = max(m_max, abs(m))
            v_max = max(v_max, v)
        m_max = block_max(m_max, scratch)
        v_max = block_max(v_max, scratch)
        if tid == 0:
            m_absmax[blk] = m_max
            v_absmax[blk] = v_max
        m_inv = float32(1.0) / max(m_max, float32(1e-38))
        v_inv = float32(1.0) / max(v_max, float32(1e-38))
        for k in range(PER_THREAD):
            i = base + k * THREADS
            if i < n:
                m_codes[i] = dynamic8.quantize_to_map(min(max(ms[k] * m_inv, float32(-1.0)), float32(1.0)), smaps[1])
                v_codes[i] = dynamic8.quantize_to_map(min(vs[k] * v_inv, float32(1.0)), smaps[3])

    return adamw8bit_step


_step = {
    dtype: Kernel(
        _make_step(load),
        f"void(float32[::1], {t}[::1], uint8[::1], uint8[::1], float32[::1], float32[::1], float32[:, ::1], "
        "float32[::1], int16[::1], int32)",
        f"adamw8bit_step[{t}]",
    )
    for dtype, (t, load, store) in ELEMENT_TYPES.items()
}


# ------------------------------------------------------------------------------------------------------ launchers
_MAPS: dict[torch.device, torch.Tensor] = {}


def _maps(device) -> torch.Tensor:
    device = torch.device(device)
    if device not in _MAPS:
        rows = []
        for signed in (True, False):
            qmap = dynamic8.dynamic_map(signed)
            rows += [qmap, torch.cat([dynamic8.midpoints(qmap), qmap.new_full((1,), 2.0)])]
        _MAPS[device] = torch.stack(rows).to(device)
    return _MAPS[device]


def hyper_parameters(*, lr, beta1, beta2, eps, weight_decay, step, grad_scale=None, device="cpu") -> torch.Tensor:
    """The fp32 [8] vector the kernel reads. lr, step and grad_scale may be 0-d device tensors (no host sync)."""

    def t(value):
        return (
            value.to(device=device, dtype=torch.float32).reshape(())
            if isinstance(value, torch.Tensor)
            else (torch.tensor(float(value), dtype=torch.float32, device=device))
        )

    lr_t, step_t = t(lr), t(step)
    b1, b2 = t(beta1), t(beta2)
    step_size = lr_t / (1 - b1**step_t)
    bias2 = torch.sqrt(1 - b2**step_t)
    gs = t(1.0 if grad_scale is None else grad_scale)
    return torch.stack([lr_t, b1, b2, t(eps), t(weight_decay), step_size, bias2, gs])


def _check(params, grads, state, work_params):
    n = params.numel()
    if params.dtype != torch.float32 or params.dim() != 1 or not params.is_contiguous():
        raise ValueError("adamw8bit_step: params must be a flat contiguous fp32 buffer (the master weights)")
    if grads.shape != params.shape or grads.dtype not in ELEMENT_TYPES:
        raise ValueError(f"adamw8bit_step: grads must be fp32 or bf16 of shape {tuple(params.shape)}")
    if state.m_codes.numel() != n or state.m_absmax.numel() != ceil_div(n, BLOCK):
        raise ValueError(f"adamw8bit_step: the state holds {state.m_codes.numel()} values, params {n}")
    if work_params is not None and (work_params.dtype != torch.bfloat16 or work_params.shape != params.shape):
        raise ValueError("adamw8bit_step: work_params must be a bf16 buffer shaped like params")


def step_kernel(params, grads, state: AdamW8bitState, hyper: torch.Tensor, work_params=None):
    """Numba kernel: updates params, state (and work_params) in place."""
    _check(params, grads, state, work_params)
    n = params.numel()
    if n == 0:
        return
    work = work_params if work_params is not None else torch.zeros(1, dtype=torch.bfloat16, device=params.device)
    _step[grads.dtype].launch(
        ceil_div(n, BLOCK),
        THREADS,
        (
            params,
            grads.contiguous(),
            state.m_codes,
            state.v_codes,
            state.m_absmax,
            state.v_absmax,
            _maps(params.device),
            hyper,
            work.view(torch.int16),
            int(work_params is not None),
        ),
    )


def reference_step(params, grads, state: AdamW8bitState, hyper: torch.Tensor, work_params=None):
    """The same update in torch ops (fp32), in place."""
    _check(params, grads, state, work_params)
    h = hyper.to(params.device)
    m, v = state.dequantize()
    g = grads.float() * h[GRAD_SCALE]
    ok = torch.isfinite(g)
    m = torch.where(ok, h[BETA1] * m + (1 - h[BETA1]) * g, m)
    v = torch.where(ok, h[BETA2] * v + (1 - h[BETA2]) * g * g, v)
    new = params * (1 - h[LR] * h[WD]) - h[STEP_SIZE] * m / (torch.sqrt(v) / h[BIAS2_SQRT] + h[EPS])
    params.copy_(torch.where(ok, new, params))
    if work_params is not None:
        work_params.copy_(params.to(torch.bfloat16))
    q = AdamW8bitState.quantize(m, v)
    for name in ("m_codes", "v_codes", "m_absmax", "v_absmax"):
        getattr(state, name).copy_(getattr(q, name))


def adamw8bit_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    state: AdamW8bitState,
    *,
    lr,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step,
    grad_scale=None,
    work_params: torch.Tensor | None = None,
):
    """One 8-bit AdamW step over a flat fp32 master buffer (in place). `step` counts from 1."""
    hyper = hyper_parameters(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        grad_scale=grad_scale,
        device=params.device,
    )
    (step_kernel if params.is_cuda else reference_step)(params, grads, state, hyper, work_params)


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim-style 8-bit AdamW over fp32 parameters (one flat state per parameter tensor)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW8bit: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32 or not p.is_contiguous():
                    raise ValueError("AdamW8bit updates contiguous fp32 parameters (keep an fp32 master copy)")
                st = self.state[p]
                if not st:
                    fresh = AdamW8bitState.zeros(p.numel(), p.device)
                    st.update(step=0, **fresh.__dict__)
                st["step"] += 1
                state = AdamW8bitState(st["m_codes"], st["v_codes"], st["m_absmax"], st["v_absmax"])
                beta1, beta2 = group["betas"]
                adamw8bit_step(
                    p.view(-1),
                    p.grad.reshape(-1),
                    state,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=st["step"],
                )
        return loss
