"""Fused residual add + RMSNorm: h = residual + x, y = h * rstd * w with rstd = 1 / sqrt(mean(h^2) + eps).

Numerics: the sum is formed in fp32 and rounded once to the input dtype; the norm is taken of that rounded h (the
tensor returned and saved for the backward), so the result equals the unfused `h = residual + x; rms_norm(h)`.
fp32 accumulation; bf16 or fp32 in and out; rstd saved in fp32.
Backward: dh_total = rstd * (w*dy - h * rstd^2 * mean(w*dy*h)) + dh, formed in fp32 and rounded once; it is the
gradient of both residual and x. dh (the gradient reaching h from the residual stream) may be None.
dw = sum over rows of dy * h * rstd, deterministic: per-block fp32 partial rows, then rms_norm's column reduction.
Shapes: any number of rows, hidden size up to 8192, odd sizes included.
The kernels are rms_norm's (ops/rms_norm.py: layout, 8-byte words, grid and expected bandwidth): its forward with the
add, its backward with + dh; without dh the backward is rms_norm's backward of h.
"""

from __future__ import annotations

import torch

from .._packed import kernels_per_codec
from .._runtime import dispatch
from . import rms_norm
from .rms_norm import (
    BACKWARD_SIGNATURE,
    FORWARD_SIGNATURE,
    _check,
    _check_weight,
    launch_backward,
    launch_forward,
    make_backward,
    make_forward,
)

_forward = kernels_per_codec(
    lambda codec: make_forward(codec, add_residual=True),
    FORWARD_SIGNATURE,
    "fused_add_rms_norm_fwd",
    launch_bounds=1024,
)
_backward = kernels_per_codec(
    lambda codec: make_backward(codec, add_dh=True), BACKWARD_SIGNATURE, "fused_add_rms_norm_bwd", launch_bounds=1024
)


# ---------------------------------------------------------------------------------------------------- launchers
def forward(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Numba kernel. residual, x [..., C] -> (y like x, h = residual + x like x, rstd fp32 [rows])."""
    _check("residual", residual, x)
    _check_weight(weight, x)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    r2 = residual.reshape(-1, n_cols).contiguous()
    y = torch.empty_like(x2)
    h = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    launch_forward(_forward, r2, x2, weight, y, h, rstd, eps, op="fused_add_rms_norm")
    return y.view(x.shape), h.view(x.shape), rstd


def backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Numba kernel. Returns (dh_total like h, dweight like weight); dh may be None."""
    _check("dy", dy, h)
    _check_weight(weight, h)
    if dh is None:
        return rms_norm.backward(dy, h, weight, rstd)  # the norm's gradient alone: rms_norm's kernel
    _check("dh", dh, h)
    n_cols = h.shape[-1]
    h2 = h.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    dh2 = dh.reshape(-1, n_cols).contiguous()
    dh_total = torch.empty_like(h2)
    dweight = torch.empty_like(weight)
    launch_backward(_backward, dy2, dh2, h2, weight, rstd, dh_total, dweight, op="fused_add_rms_norm")
    return dh_total.view(h.shape), dweight


# ---------------------------------------------------------------------------------------------------- reference
def reference_forward(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Plain torch math in fp32 (fp64 for fp64 inputs): the oracle for tests and the CPU path."""
    _check("residual", residual, x)
    compute = torch.promote_types(x.dtype, torch.float32)
    h = (residual.to(compute) + x.to(compute)).to(x.dtype)
    hf = h.to(compute)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = (hf * rstd * weight.to(compute)).to(x.dtype)
    return y, h, rstd.reshape(-1).to(torch.promote_types(rstd.dtype, torch.float32))


def reference_backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
                       rstd: torch.Tensor):
    compute = torch.promote_types(h.dtype, torch.float32)
    n_cols = h.shape[-1]
    hf = h.reshape(-1, n_cols).to(compute)
    g = dy.reshape(-1, n_cols).to(compute)
    r = rstd.reshape(-1, 1).to(compute)
    wdy = g * weight.to(compute)
    d = r * (wdy - hf * (r * r) * (wdy * hf).mean(-1, keepdim=True))
    if dh is not None:
        d = d + dh.reshape(-1, n_cols).to(compute)
    dweight = (g * hf * r).sum(0)
    return d.to(h.dtype).view(h.shape), dweight.to(weight.dtype)


fused_add_rms_norm_forward = dispatch(forward, reference_forward)
fused_add_rms_norm_backward = dispatch(backward, reference_backward)
