"""TrainStep (flat buffers, fused AdamW, clip on device) equals torch.optim.AdamW + clip_grad_norm_ on a copy."""

import copy

import pytest
import torch

from surogate.cli.param_group import param_groups
from surogate.cli.step import TrainStep, cu_seqlens_bucket
from surogate.models import LoraConfig, init_model

CONFIG = dict(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100, tie_word_embeddings=True)


def micro_batches(generator, n=2, batch=2, seq=16, packed=True):
    """packed: two documents per row (FlashAttention varlen on CUDA); else one per row (cuDNN attention)."""
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (batch, seq + 1), generator=generator)
        labels = ids[:, 1:].clone()
        labels[0, :3] = -100
        pos = torch.cat([torch.arange(5), torch.arange(seq - 5)]) if packed else torch.arange(seq)
        position_ids = pos.expand(batch, seq).contiguous()
        out.append(dict(input_ids=ids[:, :-1].contiguous(), labels=labels, position_ids=position_ids))
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_train_step_matches_torch_adamw(lora, generator):
    model = init_model(CONFIG, dtype=torch.float32, lora=LoraConfig(rank=4, alpha=8) if lora else None, seed=1)
    if lora:  # B starts at zero; move it so that A gets gradients too
        with torch.no_grad():
            for _name, p in model.trainable_parameters():
                p.normal_(0, 0.05, generator=generator)
    ref = copy.deepcopy(model)
    step = TrainStep(model, param_groups(model.trainable_parameters(), 0.1), micro_batch=2, seq_len=16,
                     max_grad_norm=0.5)
    params = [p for _, p in ref.trainable_parameters()]
    opt = torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2], weight_decay=0.1),
                             dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)], lr=1e-3)
    for i in range(1, 4):
        mbs = micro_batches(generator)
        loss_sum, valid, norm = step(mbs, lr=1e-3, step=i)
        ref_loss = 0.0
        for mb in mbs:
            loss, _ = ref.loss_sum(mb["input_ids"], mb["labels"], mb["position_ids"])
            (loss / valid).backward()
            ref_loss += loss.item()
        ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad()
        assert valid == sum(int((mb["labels"] != -100).sum()) for mb in mbs)
        assert abs(loss_sum.item() - ref_loss) <= 1e-5 * abs(ref_loss)
        assert abs(norm.item() - ref_norm.item()) <= 1e-5 * ref_norm.item()
    for (name, a), (_, b) in zip(model.trainable_parameters(), ref.trainable_parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7, name


def test_cu_seqlens_bucket_pads_to_a_power_of_two():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    cu = cu_seqlens_bucket(pos)
    assert cu.tolist() == [0, 3, 5, 7, 10, 10, 10, 10]
    assert cu_seqlens_bucket(torch.arange(4).expand(1, 4)).tolist() == [0, 4]


def _gpu_run(lora, graphs, dtype, steps=5, packed=True):
    config = dict(CONFIG, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, vocab_size=1000)
    model = init_model(config, dtype=dtype, device="cuda", seed=2, lora=LoraConfig(rank=8, alpha=16) if lora else None)
    if lora:  # redraw A and B from a seeded generator (A's peft init uses torch's global RNG; B moves off zero so
        # that every adapter gets gradients from the first step): both runs must start from the same adapters
        init = torch.Generator(device="cuda").manual_seed(7)
        with torch.no_grad():
            for _name, p in model.trainable_parameters():
                p.normal_(0, 0.02, generator=init)
    step = TrainStep(model, param_groups(model.trainable_parameters(), 0.1), micro_batch=2, seq_len=64,
                     max_grad_norm=1.0, cuda_graphs=graphs)
    g = torch.Generator().manual_seed(5)
    losses, norms = [], []
    for i in range(1, steps + 1):
        mbs = micro_batches(g, n=2, seq=64, packed=packed)  # token ids < 100, labels partly -100
        loss_sum, valid, norm = step(mbs, lr=1e-3, step=i)
        losses.append(loss_sum.item() / valid)
        norms.append(norm.item())
    params = [p.detach().double().clone() for _, p in model.trainable_parameters()]
    return torch.tensor(losses), torch.tensor(norms), params


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True])
def test_cuda_graphs_equal_eager_on_gpu_fp32(lora):
    """fp32 (reference attention, deterministic kernels): the replayed graphs compute what eager mode computes."""
    l0, n0, p0 = _gpu_run(lora, False, torch.float32)
    l1, n1, p1 = _gpu_run(lora, True, torch.float32)
    assert (l0 - l1).abs().max() <= 1e-5 * l0.abs().max(), (l0, l1)
    assert (n0 - n1).abs().max() <= 1e-4 * n0.abs().max(), (n0, n1)
    assert (n1 > 0).all()  # gradients reach every step (updates are checked against torch.optim.AdamW on CPU)
    for a, b in zip(p0, p1, strict=True):
        assert (a - b).norm() <= 1e-4 * a.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_cuda_graphs_equal_eager_on_gpu_bf16(lora, packed):
    """bf16 with FlashAttention, whose backward accumulates dq with atomics (not bit-reproducible, and AdamW's first
    steps amplify that noise on small gradients): graphs must differ from eager no more than eager from itself."""
    l0, n0, p0 = _gpu_run(lora, False, torch.bfloat16, packed=packed)
    l0b, n0b, p0b = _gpu_run(lora, False, torch.bfloat16, packed=packed)
    l1, n1, p1 = _gpu_run(lora, True, torch.bfloat16, packed=packed)
    noise_l = (l0 - l0b).abs().max().item()
    noise_p = max((a - b).norm().item() for a, b in zip(p0, p0b, strict=True))
    assert (l0 - l1).abs().max().item() <= 4 * noise_l + 2e-3 * l0.abs().max().item(), (l0, l0b, l1)
    assert max((a - b).norm().item() for a, b in zip(p0, p1, strict=True)) <= 4 * noise_p + 1e-2 * max(
        a.norm().item() for a in p0)
