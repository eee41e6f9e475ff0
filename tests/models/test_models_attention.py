"""Document layout from position ids, and the reference attention (CPU backend) against float64 SDPA and
autograd: causal, block-diagonal over packed documents, GQA; the FlashAttention cu_seqlens built on CPU."""

import torch
import torch.nn.functional as F

from surogate.kernels.testing import rel_err
from surogate.models.blocks import _reference_attention
from surogate.models.blocks._documents import build_documents, document_starts


def _positions(lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def test_document_starts_and_cu_seqlens():
    pos = _positions([[3, 5], [1, 1, 6]])
    starts = document_starts(pos)
    assert starts.tolist() == [[1, 0, 0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    offset = torch.tensor([[7, 8, 9, 10], [0, 1, 5, 6]])  # a row may start mid-document; any jump starts one
    assert document_starts(offset).tolist() == [[1, 0, 0, 0], [1, 0, 1, 0]]
    docs = build_documents(2, 8, pos, torch.device("cpu"), flash=True)
    assert docs.cu_seqlens.dtype == torch.int32 and docs.cu_seqlens.tolist() == [0, 3, 8, 9, 10, 16]
    assert docs.max_seqlen == 8 and docs.mask is None
    plain = build_documents(3, 4, None, torch.device("cpu"), flash=True)
    assert plain.cu_seqlens.tolist() == [0, 4, 8, 12] and plain.position_ids.tolist() == [0, 1, 2, 3] * 3


def _sdpa_per_document(q, k, v, lengths_per_row, seq):
    """float64 truth: causal SDPA run on each document alone, GQA by repeating kv heads."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    start = 0
    for row in lengths_per_row:
        for n in row:
            s = slice(start, start + n)
            qd, kd, vd = (t[s].transpose(0, 1) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qd, kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0),
                                               is_causal=True, scale=0.3)
            out[s] = o.transpose(0, 1)
            start += n
    return out


def test_reference_attention_against_float64_sdpa(generator):
    lengths = [[4, 9, 1, 6], [20]]
    batch, seq, n_q, n_kv, d = 2, 20, 6, 2, 8
    q, k, v = (torch.randn(batch * seq, h, d, generator=generator) for h in (n_q, n_kv, n_kv))
    dout = torch.randn(batch * seq, n_q, d, generator=generator)
    docs = build_documents(batch, seq, _positions(lengths), torch.device("cpu"), flash=False)
    out, lse, extra = _reference_attention.attention_forward(q, k, v, docs, 0.3)
    assert out.shape == q.shape and lse.shape == (n_q, batch * seq) and lse.dtype == torch.float32
    dq, dk, dv = _reference_attention.attention_backward(dout, q, k, v, out, lse, extra, docs, 0.3)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    truth = _sdpa_per_document(*leaves, lengths, seq)
    truth.backward(dout.double())
    assert rel_err(out, truth) < 1e-5
    for name, mine, leaf in zip("qkv", (dq, dk, dv), leaves, strict=True):
        assert rel_err(mine, leaf.grad) < 1e-5, name
    # logsumexp of the first query of each document is its own score (it sees only itself)
    first = torch.einsum("hd,hd->h", q[4].double(), k[4].double().repeat_interleave(3, 0)) * 0.3
    assert rel_err(lse[:, 4], first) < 1e-5
