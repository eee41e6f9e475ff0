"""Reference attention for CPU tensors: causal + block-diagonal document mask, GQA, FlashAttention's interface.

Same inputs/outputs as `_flash.py`: q [tokens, n_q, d], k/v [tokens, n_kv, d] -> out [tokens, n_q, d] (q's dtype)
and logsumexp [n_q, tokens] fp32. Numerics: scores, softmax and products in fp32 (fp64 for fp64 inputs).
Backward is the FlashAttention algebra, hand-written: P = exp(S - lse), dV = P^T dO, dP = dO V^T,
D = rowsum(dO * O), dS = P (dP - D), dQ = scale dS K, dK = scale dS^T Q; GQA grads summed over each group.
"""

from __future__ import annotations

import torch

from ._documents import Documents


def _split(t: torch.Tensor, docs: Documents, compute: torch.dtype) -> torch.Tensor:
    """[tokens, heads, d] -> [batch, heads, seq, d] in the compute dtype."""
    return t.to(compute).view(docs.batch, docs.seq, t.shape[1], t.shape[2]).transpose(1, 2)


def _merge(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, heads, seq, d] -> [tokens, heads, d]."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b * s, h, d).to(dtype)


def _probabilities(q, k, lse, docs, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~docs.mask, float("-inf"))
    return torch.exp(scores - lse.unsqueeze(-1))


def attention_forward(q, k, v, docs: Documents, scale: float):
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    qs = _split(q, docs, compute)
    ks = _split(k, docs, compute).repeat_interleave(group, dim=1)
    vs = _split(v, docs, compute).repeat_interleave(group, dim=1)
    scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~docs.mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [batch, heads, seq]
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vs)
    lse_flat = lse.permute(1, 0, 2).reshape(q.shape[1], -1).float()  # [heads, tokens]
    return _merge(out, q.dtype), lse_flat, None


def attention_backward(d_out, q, k, v, out, lse, extra, docs: Documents, scale: float):
    compute = torch.promote_types(q.dtype, torch.float32)
    n_q, n_kv = q.shape[1], k.shape[1]
    group = n_q // n_kv
    qs = _split(q, docs, compute)
    ks = _split(k, docs, compute).repeat_interleave(group, dim=1)
    vs = _split(v, docs, compute).repeat_interleave(group, dim=1)
    dos = _split(d_out, docs, compute)
    os_ = _split(out, docs, compute)
    lse4 = lse.to(compute).view(n_q, docs.batch, docs.seq).permute(1, 0, 2)
    p = _probabilities(qs, ks, lse4, docs, scale)
    dv = torch.matmul(p.transpose(-1, -2), dos)
    dp = torch.matmul(dos, vs.transpose(-1, -2))
    delta = (dos * os_).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, ks) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qs) * scale

    def fold(t):  # sum the grads of the query heads that share a kv head
        b, _, s, d = t.shape
        return t.view(b, n_kv, group, s, d).sum(2)

    return _merge(dq, q.dtype), _merge(fold(dk), k.dtype), _merge(fold(dv), v.dtype)
