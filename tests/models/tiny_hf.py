"""Tiny random Llama / Qwen2 / Qwen3 models built with transformers (no downloads), and helpers to compare
ours against them: the same weights saved with save_pretrained and loaded with surogate.models."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surogate.kernels.testing import rel_err
from surogate.models import weights

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)  # fmt: skip
CONFIGS = {
    # Llama: q/k/v/o bias on (attention_bias), llama3 rope scaling tested separately, untied head
    "llama": dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama", head_dim=16, rope_theta=10000.0,
                  tie_word_embeddings=False),
    # Qwen2: bias on q/k/v only, tied head
    "qwen2": dict(COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  tie_word_embeddings=True),
    # Qwen3: QK-norm and an explicit head_dim != hidden / heads
    "qwen3": dict(COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, rope_theta=1000000.0,
                  tie_word_embeddings=False),
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip


def hf_model(arch: str, seed: int = 0, std: float = 0.08, **overrides):
    """A transformers model with random weights (norm weights and biases randomised too, so they matter).
    std 0.08 makes the tiny models' attention far from uniform; use ~0.02 for real sizes."""
    import transformers

    cfg = dict(CONFIGS[arch], **overrides)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def save_hf(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def split_grads(ours) -> dict[str, torch.Tensor]:
    """Our parameter gradients under Hugging Face names (fused tensors split back by rows)."""
    shapes = weights.hf_shapes(ours.config)
    params = dict(ours.named_parameters())
    out = {}
    for fused, names in weights.fused_names(ours.config).items():
        grad = params[fused].grad
        start = 0
        for n in names:
            rows = shapes[n][0]
            out[n] = None if grad is None else grad[start : start + rows]
            start += rows
    return out


def randomise_lora_b(model, std: float = 0.1, generator=None) -> None:
    """Fresh adapters have B = 0 (no effect, zero A gradients): give B random values so comparisons can fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((std * torch.randn(p.shape, generator=generator)).to(p.dtype))


def packed_inputs(generator, lengths_per_row, vocab=128, ignore_frac=0.2):
    """input_ids [B, T], position_ids reset per document, labels with some -100, and the (row, start, end) docs."""
    batch, seq = len(lengths_per_row), sum(lengths_per_row[0])
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < ignore_frac] = -100
    pos = torch.zeros(batch, seq, dtype=torch.int64)
    docs = []
    for r, lengths in enumerate(lengths_per_row):
        assert sum(lengths) == seq
        start = 0
        for n in lengths:
            pos[r, start : start + n] = torch.arange(n)
            docs.append((r, start, start + n))
            start += n
    return ids, labels, pos, docs


def hf_reference(model, ids, labels, docs):
    """transformers run on each document separately: (logits [B, T, V], mean loss over valid tokens); the
    gradients of that mean loss are left in model's .grad."""
    model.zero_grad()
    logits = torch.zeros(*ids.shape, model.config.vocab_size)
    total = torch.zeros(())
    for r, s, e in docs:
        out = model(input_ids=ids[r : r + 1, s:e]).logits[0]
        logits[r, s:e] = out.detach()
        total = total + F.cross_entropy(out.float(), labels[r, s:e], ignore_index=-100, reduction="sum")
    n_valid = (labels != -100).sum()
    loss = total / n_valid
    loss.backward()
    return logits, loss.detach()


def compare_grads(ours, hf, tol: float, names=None):
    """Assert every gradient of ours matches transformers' (relative norm error < tol)."""
    mine = split_grads(ours)
    theirs = dict(hf.named_parameters())
    if hf.config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    checked = 0
    for name, grad in mine.items():
        if names is not None and name not in names:
            continue
        ref = theirs[name].grad
        assert grad is not None and ref is not None, name
        err = rel_err(grad, ref)
        assert err < tol, f"gradient of {name}: relative error {err:.2e} >= {tol:.0e}"
        checked += 1
    return checked
