"""SwiGLU as an autograd Function and an nn.Module: h = silu(gate) * up over a fused gate_up [..., 2I] projection
(the layout of a merged gate_up_proj; HF's LlamaMLP computes act_fn(gate_proj(x)) * up_proj(x) from two)."""

from __future__ import annotations

import torch

from ..ops.swiglu import swiglu_backward, swiglu_forward


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor):
        ctx.save_for_backward(gate_up)
        return swiglu_forward(gate_up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(dh, gate_up)


class SwiGLU(torch.nn.Module):
    """gate_up [..., 2I] (gate columns first) -> silu(gate) * up [..., I]. No parameters."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return SwiGLUFunction.apply(gate_up)
