"""Rows that are one document each use cuDNN attention on CUDA (blocks/_cudnn.py); packed rows use FlashAttention-2
varlen. CPU: which path a forward takes. H100 (gpu-marked): the cuDNN path gives the FlashAttention-2 path's loss,
logits and every gradient within bf16 rounding, and the CPU fp32 truth within the bf16 tolerance."""

import pytest
import torch
from tiny_hf import hf_model

from surogate.kernels.testing import rel_err
from surogate.models import LoraConfig, load_pretrained
from surogate.models.blocks import _cudnn
from surogate.models.blocks._documents import build_documents

BF16_TOL = 2e-2


def test_rows_are_documents_only_without_position_ids_and_cu_seqlens():
    pos = torch.arange(8).expand(2, 8)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    assert build_documents(2, 8, None, torch.device("cpu"), flash=False).rows_are_documents
    assert not build_documents(2, 8, pos, torch.device("cpu"), flash=False).rows_are_documents
    assert not build_documents(2, 8, None, torch.device("cpu"), flash=False, cu_seqlens=cu).rows_are_documents


def _run(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, labels, **kw)
    loss.backward()
    flat = torch.cat([p.grad.float().reshape(-1).cpu() for _, p in model.trainable_parameters()])
    return loss.item(), model(ids, **kw).float().cpu(), flat


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cudnn_rows_match_flash_varlen_and_fp32(tmp_path, generator, head_dim, lora):
    hf_model("qwen3", seed=3, head_dim=head_dim).save_pretrained(tmp_path)
    batch, seq = 2, 256
    ids = torch.randint(0, 128, (batch, seq), generator=generator)
    labels = torch.randint(0, 128, (batch, seq), generator=generator)
    labels[:, :7] = -100
    lora_cfg = LoraConfig(rank=8, alpha=16) if lora else None
    model = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", lora=lora_cfg)
    if lora:  # non-zero B, so the adapters matter
        torch.manual_seed(1)
        for _name, p in model.trainable_parameters():
            p.data.normal_(0, 0.05)
    assert _cudnn.available(0, 4, 2, head_dim), "cuDNN attention should run these shapes on the H100"
    docs = build_documents(batch, seq, None, torch.device("cuda"), flash=True)
    from surogate.models.blocks._context import BlockContext

    bc = BlockContext(config=model.config, docs=docs, inv_freq=model.inv_freq.float(), recompute=model.recompute,
                      flash=True)
    assert bc.attention is _cudnn
    ids_c, labels_c = ids.cuda(), labels.cuda()
    cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device="cuda")
    cudnn = _run(model, ids_c, labels_c)
    flash = _run(model, ids_c, labels_c, cu_seqlens=cu)  # cu_seqlens given: FlashAttention-2 varlen
    ref_model = load_pretrained(tmp_path, dtype=torch.float32, device="cpu", lora=lora_cfg)
    ref_model.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    truth = _run(ref_model, ids, labels)
    assert abs(cudnn[0] - flash[0]) < 5e-3 * flash[0]
    assert rel_err(cudnn[1], flash[1]) < 1e-2 and rel_err(cudnn[2], flash[2]) < BF16_TOL
    assert abs(cudnn[0] - truth[0]) < BF16_TOL * truth[0]
    assert rel_err(cudnn[1], truth[1]) < BF16_TOL and rel_err(cudnn[2], truth[2]) < BF16_TOL
