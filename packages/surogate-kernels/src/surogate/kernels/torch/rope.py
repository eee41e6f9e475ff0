"""RoPE as an autograd Function and an nn.Module, out of place (the ops rotate in place; autograd needs its input
intact), for users' own models.

- RoPEFunction.apply(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim): a rotated copy of a packed
  qkv [tokens, (n_q + 2 * n_kv) * head_dim] (q and k heads rotated, v copied).
- apply_rope(x, position_ids, inv_freq): one tensor of heads, x [..., tokens, heads, head_dim] (e.g. q as
  [batch, seq, heads, head_dim]; HF's [batch, heads, seq, head_dim] must be transposed first), position_ids with one
  entry per token (x.shape[:-2]). It is the packed case with n_q = heads and n_kv = 0.
- RotaryEmbedding(head_dim, theta, rope_scaling): holds inv_freq (a buffer, so it follows .to(device));
  forward(q, k, position_ids) -> (rotated q, rotated k), each as apply_rope.
"""

from __future__ import annotations

import torch

from ..ops.rope import rope_backward, rope_forward, rope_inv_freq


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, position_ids, inv_freq, n_q_heads: int, n_kv_heads: int, head_dim: int):
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.heads = (n_q_heads, n_kv_heads, head_dim)
        return rope_forward(qkv.contiguous().clone(), position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim)

    @staticmethod
    def backward(ctx, grad):
        position_ids, inv_freq = ctx.saved_tensors
        d_qkv = rope_backward(grad.contiguous().clone(), position_ids, inv_freq, *ctx.heads)
        return d_qkv, None, None, None, None, None


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim] with one position per x.shape[:-2] entry -> rotated copy (autograd-aware)."""
    if x.dim() < 2:
        raise ValueError(f"apply_rope needs x as [..., heads, head_dim], got {tuple(x.shape)}")
    heads, head_dim = x.shape[-2:]
    packed = x.reshape(-1, heads * head_dim)
    return RoPEFunction.apply(packed, position_ids, inv_freq, heads, 0, head_dim).view(x.shape)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0, rope_scaling: dict | None = None, device=None):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, rope_scaling).to(device), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor):
        return apply_rope(q, position_ids, self.inv_freq), apply_rope(k, position_ids, self.inv_freq)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"
