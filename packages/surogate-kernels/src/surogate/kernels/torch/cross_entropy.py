"""Cross-entropy as an autograd Function and an nn.Module (like Liger's LigerCrossEntropyLoss).

The gradient is computed in the forward pass and written INTO THE LOGITS' STORAGE (no [rows, V] gradient is
allocated): the logits tensor holds dlogits afterwards. Clone it first if you need the logits after the loss.
reduction "mean" divides by the number of non-ignored targets (clamped to >= 1: all-ignored gives 0, not NaN),
computed on the device; "sum" returns the summed loss. backward() may run once (the gradient is scaled in place).
"""

from __future__ import annotations

import torch

from ..ops.cross_entropy import cross_entropy_forward_backward


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        dlogits = logits.detach().view(-1, logits.shape[-1])
        flat_targets = targets.reshape(-1)
        scale = 1.0
        if reduction == "mean":
            scale = 1.0 / (flat_targets != ignore_index).sum().clamp(min=1).to(torch.float32)
        loss_sum, _ = cross_entropy_forward_backward(dlogits, flat_targets, ignore_index, scale)
        ctx.save_for_backward(dlogits)
        ctx.logits_shape = logits.shape
        return loss_sum * scale if reduction == "mean" else loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (dlogits,) = ctx.saved_tensors
        dlogits.mul_(grad_output)
        return dlogits.view(ctx.logits_shape), None, None, None


class CrossEntropyLoss(torch.nn.Module):
    """loss(logits [..., V], targets [...]); overwrites the logits with their gradient (see the module docstring)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return CrossEntropyFunction.apply(logits, targets, self.ignore_index, self.reduction)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
