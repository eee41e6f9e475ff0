"""A fused linear projection with LoRA adapters on row slices: forward and hand-written backward.

y = x W^T (+ b), then for each adapter (rows, A [r, in], B [out_rows, r]):
    u = drop(x) A^T            (saved: [tokens, r], small)
    y[:, rows] += scale * u B^T
drop(x) = x * mask / (1 - p) with a bool mask drawn in forward (None when p = 0 or not training), as peft's
nn.Dropout in front of lora_A. Backward, given dy:
    dx = dy W + sum over adapters of drop(scale * dy[:, rows] B A)       (only when the input needs a gradient)
    dW = dy^T x (only for a trainable W), db = column sums of dy (surogate.kernels bias_grad)
    dB = scale * dy[:, rows]^T u,  dA = (scale * dy[:, rows] B)^T drop(x)
Numerics: torch GEMMs in the weight dtype (fp32 accumulation inside BLAS / cuBLAS); nothing is summed in place
into a caller's tensor. The three base GEMMs (x W^T, dy W, dy^T x) go through `gemm` (a _gemm.Gemm: a quantised
recipe or a QLoRA base weight) when the layer has one; gemm None is the plain path. The LoRA GEMMs are always plain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _ops


@dataclass
class Lora:
    rows: slice  # rows of the fused output (= columns of y) the adapter adds to
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out_rows, r]
    mask: torch.Tensor | None = None  # dropout keep-mask [tokens, in], bool


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """Keep-mask for LoRA dropout (None when p == 0)."""
    if p <= 0.0:
        return None
    return torch.rand(x.shape, device=x.device) >= p


def _drop(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    return x if mask is None else x * mask.to(x.dtype) * (1.0 / (1.0 - p))


def projection_forward(x, weight, bias, loras: list[Lora], scale: float, p: float, gemm=None):
    """-> (y [tokens, out], [u per adapter])."""
    y = F.linear(x, weight, bias) if gemm is None else gemm.forward(x, weight, bias)
    us = []
    for lora in loras:
        u = F.linear(_drop(x, lora.mask, p), lora.A)
        y[:, lora.rows].addmm_(u, lora.B.t(), alpha=scale)  # into the slice: no [tokens, out] temporary
        us.append(u)
    return y, us


def lora_inputs(x, loras: list[Lora], p: float) -> list[torch.Tensor]:
    """The saved u = drop(x) A^T of each adapter, without the base GEMM (for recompute)."""
    return [F.linear(_drop(x, lora.mask, p), lora.A) for lora in loras]


def projection_backward(dy, x, weight, loras: list[Lora], us, scale: float, p: float, need_dx: bool,
                        need_dw: bool, need_db: bool, need_lora: list[tuple[bool, bool]], gemm=None):
    """-> (dx | None, dW | None, db | None, [(dA | None, dB | None) per adapter])."""
    if gemm is None:
        dx = torch.matmul(dy, weight) if need_dx else None
        dw = torch.matmul(dy.t(), x) if need_dw else None
    else:
        dx, dw = gemm.backward(dy, x, weight, need_dx, need_dw)
    db = _ops.bias_grad(dy) if need_db else None
    grads = []
    for lora, u, (need_a, need_b) in zip(loras, us, need_lora, strict=True):
        dys = dy[:, lora.rows]
        d_b = torch.matmul(dys.t(), u).mul_(scale) if need_b else None
        d_a = None
        if need_a or need_dx:
            du = torch.matmul(dys, lora.B).mul_(scale)  # [tokens, r]
            if need_a:
                d_a = torch.matmul(du.t(), _drop(x, lora.mask, p))
            if need_dx:
                if lora.mask is None:
                    dx.addmm_(du, lora.A)
                else:
                    dx += _drop(torch.matmul(du, lora.A), lora.mask, p)
        grads.append((d_a, d_b))
    return dx, dw, db, grads
