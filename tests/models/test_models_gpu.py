"""On the H100 (gpu-marked): FlashAttention varlen + Numba kernels at bf16 against fp32 truths.

- a tiny packed model: the CUDA path (FlashAttention varlen, kernels) vs the CPU fp32 path;
- a Qwen3-0.6B-shaped model (random weights, vocab 151936, 28 layers, tied head), 2 x 2048 tokens in packed
  documents: our bf16 loss, logits and gradients vs transformers in fp32 (each document run alone) within the
  bf16 tolerance 2e-2; prints step time and peak memory (ours full / LoRA, transformers bf16 for reference).
"""

import time

import pytest
import torch
from surogate.kernels.testing import rel_err
from surogate.models import LoraConfig, load_pretrained
from tiny_hf import hf_model, packed_inputs, split_grads

pytestmark = pytest.mark.gpu
BF16_TOL = 2e-2


def _flat_grads(named):
    return torch.cat([g.detach().float().reshape(-1).cpu() for _, g in sorted(named.items())])


def test_tiny_packed_cuda_bf16_matches_cpu_fp32(tmp_path, generator):
    hf_model("qwen3", seed=2, head_dim=64).save_pretrained(tmp_path)
    ids, labels, pos, _ = packed_inputs(generator, [[5, 40, 19], [64]])
    results = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16), ("cuda", torch.float32)):
        model = load_pretrained(tmp_path, dtype=dtype, device=device)
        assert model._uses_flash() == (dtype == torch.bfloat16)
        loss = model.loss(ids.to(device), labels.to(device), pos.to(device))
        loss.backward()
        logits = model(ids.to(device), pos.to(device)).float().cpu()
        results.append((loss.item(), logits, _flat_grads(split_grads(model))))
    (loss32, logits32, grads32), (loss16, logits16, grads16), (loss_ref, logits_ref, grads_ref) = results
    assert abs(loss16 - loss32) < BF16_TOL * loss32
    assert rel_err(logits16, logits32) < BF16_TOL
    assert rel_err(grads16, grads32) < BF16_TOL
    # fp32 on CUDA runs the reference attention and the Numba kernels in fp32
    assert abs(loss_ref - loss32) < 1e-4 * loss32 and rel_err(logits_ref, logits32) < 1e-4
    assert rel_err(grads_ref, grads32) < 1e-4


QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)  # fmt: skip


def _time_step(model, ids, labels, pos, steps=3):
    """(ms per forward + backward, peak GiB) after one warm-up step."""

    def fn():
        model.zero_grad(set_to_none=True)
        model.loss(ids, labels, pos).backward()

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, torch.cuda.max_memory_allocated() / 2**30


def test_qwen3_06b_shape_bf16_vs_transformers_fp32(tmp_path, generator):
    from transformers import AutoModelForCausalLM

    # bf16 weights: ours and the fp32 truth use exactly the same values
    hf = hf_model("qwen3", seed=3, std=0.02, **QWEN3_06B).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    del hf
    ids, labels, pos, docs = packed_inputs(generator, [[700, 1000, 348], [2048]], vocab=151936)
    ids, labels, pos = ids.cuda(), labels.cuda(), pos.cuda()

    ours = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    loss = ours.loss(ids, labels, pos)
    loss.backward()
    with torch.no_grad():
        logits = ours(ids, pos).float()
    mine = {n: g for n, g in split_grads(ours).items()}
    ms, gib = _time_step(ours, ids, labels, pos)
    print(f"\nsurogate full bf16 Qwen3-0.6B shape, 2x2048 tokens: {ms:.1f} ms/step, peak {gib:.2f} GiB")
    del ours

    truth = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa").cuda()
    truth.zero_grad()
    total = torch.zeros((), device="cuda")
    ref_logits = torch.empty_like(logits)
    for r, s, e in docs:
        out = truth(input_ids=ids[r : r + 1, s:e]).logits[0]
        ref_logits[r, s:e] = out.detach()
        total = total + torch.nn.functional.cross_entropy(out, labels[r, s:e], ignore_index=-100, reduction="sum")
    ref_loss = total / (labels != -100).sum()
    ref_loss.backward()
    theirs = dict(truth.named_parameters())
    ref = {n: theirs[n].grad for n in mine}
    loss_err = abs(loss.item() - ref_loss.item()) / ref_loss.item()
    logit_err = rel_err(logits, ref_logits)
    grad_err = rel_err(_flat_grads(mine), _flat_grads(ref))
    worst = max((rel_err(mine[n], ref[n]), n) for n in mine)
    print(f"vs transformers fp32: loss {loss_err:.2e}, logits {logit_err:.2e}, all grads {grad_err:.2e}, "
          f"worst tensor {worst[0]:.2e} ({worst[1]})")
    assert loss_err < BF16_TOL and logit_err < BF16_TOL and grad_err < BF16_TOL
    del truth, ref, theirs, ref_logits
    torch.cuda.empty_cache()

    for recompute in (None, "block"):
        lora = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", lora=LoraConfig(rank=16, alpha=32),
                               recompute=recompute)
        ms, gib = _time_step(lora, ids, labels, pos)
        print(f"surogate LoRA r16 (7 modules) bf16, recompute={recompute}: {ms:.1f} ms/step, peak {gib:.2f} GiB")
        del lora
        torch.cuda.empty_cache()

    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()

    class _HF:  # whole rows (no document masking without flash-attn): a speed reference only
        def zero_grad(self, set_to_none=True):
            hf16.zero_grad(set_to_none=set_to_none)

        def loss(self, ids, labels, pos):
            out = hf16(input_ids=ids).logits.flatten(0, 1).float()
            return torch.nn.functional.cross_entropy(out, labels.flatten(), ignore_index=-100)

    ms, gib = _time_step(_HF(), ids, labels, pos)
    print(f"transformers bf16 sdpa (full, fp32 CE on full logits): {ms:.1f} ms/step, peak {gib:.2f} GiB")
