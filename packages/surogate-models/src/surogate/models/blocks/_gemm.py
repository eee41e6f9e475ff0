"""The GEMMs of one base linear layer (qkv, o, gate_up, down) when they are not plain torch GEMMs: a quantised
recipe (fp8-hybrid, nvfp4) and / or a QLoRA base weight. Built once per layer at model construction, so the
default path (recipe bf16, no QLoRA) has no Gemm at all and runs F.linear / torch.matmul as before.

With x [tokens, K], W [N, K], dy [tokens, N]:
- recipe layer (context mode "fp8" / "nvfp4"): y = recipe.forward(x, W) (+ bias), (dx, dW) = recipe.backward(dy, x,
  W) with the layer's LinearContext: the recipe quantises x, W and dy per its rules (see surogate.quant.recipe).
  dW (full fine-tuning only) comes out in the weight's dtype.
- bf16 layer with a QLoRA base (lm_head-like skips, or recipe bf16): y = F.linear(x, deq(W), bias) and
  dx = dy deq(W), where deq(W) is the QuantizedWeight dequantised to the activation dtype: exactly the GEMMs of a
  model whose weights are deq(W). The dequantised copy is a temporary, freed when the GEMM returns; backward
  dequantises again rather than keeping it. QLoRA base weights are frozen: no dW.
The LoRA A / B GEMMs never come here: they stay in the model dtype (_projection.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surogate.quant import LinearContext, QuantizedWeight, Recipe


class Gemm:
    def __init__(self, recipe: Recipe, ctx: LinearContext, base: QuantizedWeight | None = None):
        self.recipe = recipe
        self.ctx = ctx
        self.base = base  # QLoRA: the frozen base weight (the weight slot of the block is then None)
        self.quantized = ctx.mode != "bf16"

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantized:
            y = self.recipe.forward(x, weight if self.base is None else self.base, self.ctx)
            return y if bias is None else y.add_(bias)
        return F.linear(x, self.base.dequantize(x.dtype), bias)

    def backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, need_dx: bool,
                 need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (dx | None, dW | None)."""
        if not (need_dx or need_dw):
            return None, None
        if self.quantized:
            w = weight if self.base is None else self.base
            return self.recipe.backward(dy, x, w, self.ctx, need_dx=need_dx, need_dw=need_dw,
                                        out_dtype=None if weight is None else weight.dtype)
        dx = torch.matmul(dy, self.base.dequantize(dy.dtype)) if need_dx else None
        return dx, None  # a QLoRA base weight is frozen: no dW
