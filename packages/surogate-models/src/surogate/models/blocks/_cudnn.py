"""cuDNN attention for rows that are one causal document each (no packing), CUDA bf16/fp16.

Same interface as `_flash.py`: q [tokens, n_q, d], k/v [tokens, n_kv, d] (tokens = batch * seq, row-major) ->
out [tokens, n_q, d]; the backward's dq, dk, dv are [batch, seq, heads, d] strided views (the caller reshapes).
The rows are viewed as [batch, heads, seq, d] (strided views, no copies) and run through torch's
scaled_dot_product_attention pinned to the cuDNN backend (causal, GQA native). Why: on the H100 cuDNN's fused
attention is about 2x FlashAttention-2 forward and 1.3x backward (tools/dev/attention_backends.py,
benchmarks/RESULTS.md); FlashAttention-2 varlen stays the path for packed rows (document masking).
The forward records a small autograd graph on detached views of q, k, v (cuDNN keeps its own output and
logsumexp in it); the backward replays it with torch.autograd.grad, so the blocks' hand-written backward can call
it like the FlashAttention one. dk, dv come back summed over each GQA group. Numerics: fp32 softmax and
accumulation inside cuDNN; differences to FlashAttention-2 are bf16 rounding (relative ~2e-3 measured).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._documents import Documents


def _rows(t: torch.Tensor, docs: Documents) -> torch.Tensor:
    """[tokens, heads, d] -> [batch, heads, seq, d] view."""
    return t.view(docs.batch, docs.seq, t.shape[1], t.shape[2]).transpose(1, 2)


@functools.cache
def available(device_index: int, n_q: int, n_kv: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether cuDNN attention runs these shapes on this device (asked once per shape, outside any graph capture)."""
    if not torch.backends.cudnn.is_available() or (torch.backends.cudnn.version() or 0) < 90000:
        return False
    try:
        q = torch.zeros(1, n_q, 128, head_dim, device=f"cuda:{device_index}", dtype=dtype)
        kv = torch.zeros(1, n_kv, 128, head_dim, device=f"cuda:{device_index}", dtype=dtype)
        params = torch.backends.cuda.SDPAParams(q, kv, kv, None, 0.0, True, n_q != n_kv)
        return bool(torch.backends.cuda.can_use_cudnn_attention(params, False))
    except (RuntimeError, TypeError, AttributeError):
        return False


def attention_forward(q, k, v, docs: Documents, scale: float):
    qd, kd, vd = (_rows(t, docs).detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
    flat = out.detach().transpose(1, 2).reshape(docs.tokens, q.shape[1], q.shape[2])
    return flat, None, (out, qd, kd, vd)


def attention_backward(d_out, q, k, v, out, lse, extra, docs: Documents, scale: float):
    graph_out, qd, kd, vd = extra
    d = _rows(d_out, docs)
    dq, dk, dv = torch.autograd.grad(graph_out, (qd, kd, vd), d)
    return tuple(g.transpose(1, 2) for g in (dq, dk, dv))  # [batch, seq, heads, d] views: no copies
