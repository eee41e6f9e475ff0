"""Qwen3's per-head q/k RMSNorm fused with RoPE as an autograd Function and an nn.Module, out of place (the ops
work in place; autograd needs the input intact), for users' own models.

QKNormRoPEFunction.apply(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, eps) and
QKNormRoPE(n_q_heads, n_kv_heads, head_dim, eps, theta, rope_scaling)(qkv, position_ids) take the packed
qkv [..., tokens, (n_q + 2 * n_kv) * head_dim] and return a copy with q and k normed (weights q_weight / k_weight
[head_dim]) and rotated, v copied.
"""

from __future__ import annotations

import torch

from ..ops.qk_norm_rope import qk_norm_rope_backward, qk_norm_rope_forward
from ..ops.rope import rope_inv_freq


class QKNormRoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int,
                head_dim: int, eps: float):
        x = qkv.contiguous()
        out, rstd = qk_norm_rope_forward(x.clone(), q_weight, k_weight, position_ids, inv_freq, n_q_heads,
                                         n_kv_heads, head_dim, eps)
        ctx.save_for_backward(x, q_weight, k_weight, rstd, position_ids, inv_freq)
        ctx.heads = (n_q_heads, n_kv_heads, head_dim)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, q_weight, k_weight, rstd, position_ids, inv_freq = ctx.saved_tensors
        d_qkv, dq_weight, dk_weight = qk_norm_rope_backward(grad.contiguous().clone(), x, q_weight, k_weight, rstd,
                                                             position_ids, inv_freq, *ctx.heads)
        return d_qkv, dq_weight, dk_weight, None, None, None, None, None, None


class QKNormRoPE(torch.nn.Module):
    def __init__(self, n_q_heads: int, n_kv_heads: int, head_dim: int, eps: float = 1e-6, theta: float = 1e6,
                 rope_scaling: dict | None = None, device=None, dtype=None):
        super().__init__()
        self.heads = (n_q_heads, n_kv_heads, head_dim)
        self.eps = eps
        self.q_weight = torch.nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))
        self.k_weight = torch.nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, rope_scaling).to(device), persistent=False)

    def forward(self, qkv: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return QKNormRoPEFunction.apply(qkv, self.q_weight, self.k_weight, position_ids, self.inv_freq, *self.heads,
                                        self.eps)

    def extra_repr(self) -> str:
        n_q, n_kv, head_dim = self.heads
        return f"n_q_heads={n_q}, n_kv_heads={n_kv}, head_dim={head_dim}, eps={self.eps}"
