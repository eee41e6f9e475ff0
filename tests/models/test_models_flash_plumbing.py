"""The CUDA attention path's plumbing on CPU: FlashAttention's two aten ops are replaced by fakes that check the
arguments against the op schemas (as measured on the H100) and compute attention from the cu_seqlens they are
given; the model forced onto that path must still match transformers. The real kernels run in test_models_gpu.py."""

import pytest
import torch
from tiny_hf import compare_grads, hf_model, hf_reference, packed_inputs

from surogate.kernels.testing import rel_err
from surogate.models import load_pretrained
from surogate.models.blocks import _reference_attention
from surogate.models.blocks._documents import Documents
from surogate.models.model import CausalLM


def _documents(cu, tokens, max_seqlen):
    """A one-row Documents whose mask is block-diagonal causal over the flattened tokens, from cu_seqlens."""
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == tokens and (cu[1:] >= cu[:-1]).all()
    doc = torch.searchsorted(cu[1:].long(), torch.arange(tokens), right=True)
    assert torch.bincount(doc).max() <= max_seqlen
    mask = (doc[:, None] == doc[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    return Documents(1, tokens, torch.zeros(tokens, dtype=torch.int32), mask=mask[None, None])


def _check_qkv(q, k, v):
    assert q.dim() == k.dim() == v.dim() == 3 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape and q.shape[0] == k.shape[0]


CALLS = {"forward": 0, "backward": 0}


def fake_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None):
    CALLS["forward"] += 1
    _check_qkv(q, k, v)
    assert cu_q is cu_k or torch.equal(cu_q, cu_k)
    assert isinstance(max_q, int) and max_q == max_k and dropout_p == 0.0 and is_causal and not return_debug_mask
    docs = _documents(cu_q, q.shape[0], max_q)
    out, lse, _ = _reference_attention.attention_forward(q, k, v, docs, scale)
    assert lse.shape == (q.shape[1], q.shape[0])
    rng_state = torch.tensor([7, 9], dtype=torch.int64)
    return out, lse, rng_state, torch.empty(0), torch.empty(0)


def fake_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng_state, unused, *,
                  scale=None):
    CALLS["backward"] += 1
    _check_qkv(q, k, v)
    assert dout.shape == out.shape == q.shape and dout.is_contiguous() and lse.shape == (q.shape[1], q.shape[0])
    assert rng_state.tolist() == [7, 9] and unused.numel() == 0 and dropout_p == 0.0 and is_causal
    docs = _documents(cu_q, q.shape[0], max_q)
    return _reference_attention.attention_backward(dout, q, k, v, out, lse, None, docs, scale)


@pytest.fixture()
def flash_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", fake_forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", fake_backward)
    monkeypatch.setattr(CausalLM, "_uses_flash", lambda self: True)


@pytest.mark.parametrize("recompute", [None, "att"])
@pytest.mark.parametrize("rows", [[[24], [24]], [[5, 11, 8], [1, 23]]])
def test_flash_path_matches_transformers(rows, recompute, flash_on_cpu, tmp_path, generator):
    hf = hf_model("qwen3", seed=21)
    hf.save_pretrained(tmp_path)
    ids, labels, pos, docs = packed_inputs(generator, rows)
    ref_logits, ref_loss = hf_reference(hf, ids, labels, docs)
    ours = load_pretrained(tmp_path, dtype=torch.float32, recompute=recompute)
    CALLS.update(forward=0, backward=0)
    packed = len(rows[0]) > 1
    assert rel_err(ours(ids, pos if packed else None), ref_logits) < 1e-4
    loss = ours.loss(ids, labels, pos)
    assert abs(loss.item() - ref_loss.item()) < 1e-4 * ref_loss.item()
    loss.backward()
    compare_grads(ours, hf, 1e-4)
    layers = ours.config.num_layers  # forward: logits + loss; recompute="att" reruns each layer's attention
    assert CALLS == {"forward": 2 * layers + (layers if recompute else 0), "backward": layers}
