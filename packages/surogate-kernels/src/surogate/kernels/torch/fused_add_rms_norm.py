"""Fused residual add + RMSNorm as an autograd Function and an nn.Module:
(y, h) = (rmsnorm(residual + x), residual + x), the pre-norm step of a decoder layer (h is the new residual stream,
y the normalised input of the next block)."""

from __future__ import annotations

import torch

from ..ops.fused_add_rms_norm import fused_add_rms_norm_backward, fused_add_rms_norm_forward


class FusedAddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
        y, h, rstd = fused_add_rms_norm_forward(residual, x, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero tensor to read)
        return y, h

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dh: torch.Tensor | None):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dh_total, dweight = fused_add_rms_norm_backward(dy, dh, h, weight, rstd)
        return dh_total, dh_total, dweight, None


class FusedAddRMSNorm(torch.nn.Module):
    """forward(residual, x) -> (rmsnorm(residual + x) * weight, residual + x)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, residual: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return FusedAddRMSNormFunction.apply(residual, x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
