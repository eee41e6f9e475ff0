"""On the H100 (gpu-marked): FlashAttention varlen + Numba kernels at bf16 against fp32 truths.

- a tiny packed model: the CUDA path (FlashAttention varlen, kernels) vs the CPU fp32 path;
- a Qwen3-0.6B-shaped model (random weights, vocab 151936, 28 layers, tied head), 2 x 2048 tokens in packed
  documents: our bf16 loss, logits and gradients vs transformers in fp32 (each document run alone) within the
  bf16 tolerance 2e-2; prints step time and peak memory (ours full / LoRA, transformers bf16 for reference).
"""

import time

import pytest
import torch
from tiny_hf import hf_model, packed_inputs, split_grads

from surogate.kernels.testing import rel_err
from surogate.models import LoraConfig, load_pretrained

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


def _hf_per_document(model, ids, labels, docs):
    """transformers on each document alone: (mean loss, logits [B, T, V] fp32, {name: grad})."""
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), device="cuda")
    logits = torch.empty(*ids.shape, model.config.vocab_size, device="cuda")
    for r, s, e in docs:
        out = model(input_ids=ids[r : r + 1, s:e]).logits[0].float()
        logits[r, s:e] = out.detach()
        total = total + torch.nn.functional.cross_entropy(out, labels[r, s:e], ignore_index=-100, reduction="sum")
    loss = total / (labels != -100).sum()
    loss.backward()
    return loss.item(), logits, {n: p.grad for n, p in model.named_parameters()}


class _HFStep:
    """transformers with our loss interface, on whole rows (no document masking without flash-attn): timing only."""

    def __init__(self, model):
        self.model = model

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def loss(self, ids, labels, pos):
        out = self.model(input_ids=ids).logits.flatten(0, 1).float()
        return torch.nn.functional.cross_entropy(out, labels.flatten(), ignore_index=-100)


def _errors(loss, logits, grads, truth):
    t_loss, t_logits, t_grads = truth
    return (abs(loss - t_loss) / t_loss, rel_err(logits, t_logits),
            rel_err(_flat_grads({n: grads[n] for n in t_grads}), _flat_grads(t_grads)))  # fmt: skip


def test_qwen3_06b_shape_bf16_vs_transformers_fp32(tmp_path, generator):
    """Ours in bf16 against transformers in fp32 (the truth), next to transformers in bf16: ours must be within
    the bf16 tolerance, or at worst 1.25x transformers' own bf16 error (28 random layers may amplify rounding)."""
    from transformers import AutoModelForCausalLM

    # bf16 weights: every run uses exactly the same values
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
    mine = (loss.item(), logits, split_grads(ours))
    ms, gib = _time_step(ours, ids, labels, pos)
    print(f"\nsurogate full bf16 Qwen3-0.6B shape, 2x2048 tokens: {ms:.1f} ms/step, peak {gib:.2f} GiB")
    del ours, logits, loss
    torch.cuda.empty_cache()

    truth_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa")
    truth = _hf_per_document(truth_model.cuda(), ids, labels, docs)
    truth = (truth[0], truth[1], {n: g.detach().float().cpu() for n, g in truth[2].items() if n in mine[2]})
    del truth_model
    torch.cuda.empty_cache()
    ours_err = _errors(*mine, truth)
    del mine
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    hf_err = _errors(*_hf_per_document(hf16, ids, labels, docs), truth)
    for what, a, b in zip(("loss", "logits", "all gradients"), ours_err, hf_err, strict=True):
        print(f"{what} vs transformers fp32: surogate bf16 {a:.2e}, transformers bf16 {b:.2e}")
    for what, a, b in zip(("loss", "logits", "all gradients"), ours_err, hf_err, strict=True):
        assert a < max(BF16_TOL, 1.25 * b), f"{what}: {a:.2e} (transformers bf16: {b:.2e})"

    ms, gib = _time_step(_HFStep(hf16), ids, labels, pos)
    print(f"transformers bf16 sdpa (full, fp32 CE on full logits): {ms:.1f} ms/step, peak {gib:.2f} GiB")
    del hf16
    torch.cuda.empty_cache()

    for recompute in (None, "block"):
        lora = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", lora=LoraConfig(rank=16, alpha=32),
                               recompute=recompute)
        ms, gib = _time_step(lora, ids, labels, pos)
        print(f"surogate LoRA r16 (7 modules) bf16, recompute={recompute}: {ms:.1f} ms/step, peak {gib:.2f} GiB")
        del lora
        torch.cuda.empty_cache()
