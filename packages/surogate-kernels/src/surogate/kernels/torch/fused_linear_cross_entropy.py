"""lm_head + cross-entropy as one autograd Function and nn.Module (like Liger's LigerFusedLinearCrossEntropyLoss).

loss = CE(hidden @ weight.T, targets) without ever building [rows, V] logits: the gradients are computed during the
forward pass chunk by chunk (ops/fused_linear_cross_entropy.py) and kept until backward, which only scales them by
the incoming gradient. The weight gradient is accumulated in fp32 and handed to autograd in the weight's dtype.
reduction "mean" divides by the number of non-ignored targets (clamped to >= 1), computed on the device.
"""

from __future__ import annotations

import torch

from ..ops.fused_linear_cross_entropy import fused_linear_cross_entropy


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                reduction: str = "mean", chunk_rows: int | None = None):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        scale = 1.0
        if reduction == "mean":
            scale = 1.0 / (targets.reshape(-1) != ignore_index).sum().clamp(min=1).to(torch.float32)
        loss_sum, _, d_hidden, d_weight = fused_linear_cross_entropy(
            hidden, weight, targets, ignore_index, scale, chunk_rows, ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum * scale if reduction == "mean" else loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        d_hidden = d_hidden.mul_(grad_output)
        if d_weight is not None:
            d_weight = d_weight.mul_(grad_output).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None, None


class LinearCrossEntropyLoss(torch.nn.Module):
    """loss(hidden [..., C], weight [V, C], targets [...]): CE of the lm_head logits, computed in row chunks."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", chunk_rows: int | None = None):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_rows = chunk_rows

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return LinearCrossEntropyFunction.apply(hidden, weight, targets, self.ignore_index, self.reduction,
                                                self.chunk_rows)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, chunk_rows={self.chunk_rows}"
