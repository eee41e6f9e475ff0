"""FlashAttention-2 varlen for CUDA tensors (torch.ops.aten._flash_attention_forward / _backward).

q [tokens, n_q, d], k/v [tokens, n_kv, d] (views with a unit last stride are fine: FlashAttention reads row and
head strides), bf16/fp16, GQA native. Causal inside each document given by cu_seqlens (document masking for
packed rows). Returns out [tokens, n_q, d] and logsumexp [n_q, tokens] fp32, plus (rng_state, unused) that the
backward takes back (dropout is 0, so they carry nothing). Signatures measured on the H100 with torch 2.11
(numba-cuda.md section 11); the backward returns dk/dv already summed over each GQA group.
"""

from __future__ import annotations

import torch

from ._documents import Documents


def attention_forward(q, k, v, docs: Documents, scale: float):
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen, 0.0, True, False, scale=scale
    )
    return out, lse, (rng_state, unused)


def attention_backward(d_out, q, k, v, out, lse, extra, docs: Documents, scale: float):
    rng_state, unused = extra
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        d_out.contiguous(), q, k, v, out, lse, docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen,
        docs.max_seqlen, 0.0, True, rng_state, unused, scale=scale,
    )
    return dq, dk, dv
