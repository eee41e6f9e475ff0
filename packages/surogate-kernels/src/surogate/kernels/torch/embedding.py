"""Embedding as an autograd Function and an nn.Module (a drop-in for nn.Embedding without padding_idx / max_norm).

The backward is deterministic (sorted ids, fixed-order fp32 sums, no atomics): reruns give bitwise-equal gradients.
"""

from __future__ import annotations

import torch

from ..ops.embedding import embedding_backward, embedding_forward


class EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor):
        ctx.save_for_backward(ids)
        ctx.num_embeddings = weight.shape[0]
        return embedding_forward(ids, weight.detach())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return None, embedding_backward(dy, ids, ctx.num_embeddings)


class Embedding(torch.nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        torch.nn.init.normal_(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return EmbeddingFunction.apply(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"
