"""LoRA against peft: our adapter files load in peft with the same logits, our adapter gradients equal peft's,
merge_lora equals merge_and_unload; plus init, frozen base weights, rsLoRA and dropout."""

import json
import math

import pytest
import torch
from tiny_hf import hf_model, hf_reference, packed_inputs, randomise_lora_b

from surogate.kernels.testing import rel_err
from surogate.models import LoraConfig, ModelError, load_pretrained
from surogate.models.blocks._projection import Lora, projection_backward, projection_forward

TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        path = tmp_path_factory.mktemp(arch)
        extra = {"attention_bias": True} if arch == "llama" else {}  # o_proj bias next to its adapter
        hf_model(arch, seed=10 + len(out), **extra).save_pretrained(path)
        out[arch] = path
    return out


def _peft_names(peft_model):
    return {n.replace("base_model.model.", "").replace(".default", ""): p
            for n, p in peft_model.named_parameters() if "lora_" in n}  # fmt: skip


@pytest.mark.parametrize("arch,lora", [
    ("llama", LoraConfig(rank=4, alpha=8)),
    ("qwen2", LoraConfig(rank=2, alpha=3, target_modules=("q_proj", "v_proj", "down_proj"))),
    ("qwen3", LoraConfig(rank=4, alpha=16, use_rslora=True, target_modules="all-linear")),
])  # fmt: skip
def test_adapter_loads_in_peft_with_same_logits_and_grads(arch, lora, folders, generator, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = load_pretrained(folders[arch], dtype=torch.float32, lora=lora)
    randomise_lora_b(ours, generator=generator)
    ours.save_adapter(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (lora.rank, lora.alpha, lora.use_rslora)
    assert cfg["base_model_name_or_path"] == str(folders[arch])

    hf = AutoModelForCausalLM.from_pretrained(folders[arch], dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(hf, tmp_path, is_trainable=True)
    ids, labels, pos, docs = packed_inputs(generator, [[7, 9], [16]])
    ref_logits, ref_loss = hf_reference(peft_model, ids, labels, docs)
    assert rel_err(ours(ids, pos), ref_logits) < TOL
    loss = ours.loss(ids, labels, pos)
    assert abs(loss.item() - ref_loss.item()) < TOL * ref_loss.item()
    loss.backward()
    theirs = _peft_names(peft_model)
    mine = dict(ours.trainable_parameters())
    assert set(mine) == set(theirs)
    assert len(mine) == 2 * len(lora.target_modules) * 2
    for name, p in mine.items():
        assert rel_err(p.grad, theirs[name].grad) < TOL, name
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_merge_equals_peft_merge_and_unload(folders, generator, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ours = load_pretrained(folders["qwen3"], dtype=torch.float32, lora=LoraConfig(rank=4, alpha=8))
    randomise_lora_b(ours, generator=generator)
    ours.save_adapter(tmp_path / "adapter")
    with pytest.raises(ModelError, match="merge_lora"):
        ours.save_pretrained(tmp_path / "unmerged")
    ids, _, pos, _ = packed_inputs(generator, [[10, 6]])
    before = ours(ids, pos)
    ours.merge_lora()
    assert ours.lora_config is None and not ours.trainable_parameters()
    assert not any("lora_" in n for n, _ in ours.named_parameters())
    assert rel_err(ours(ids, pos), before) < TOL
    ours.save_pretrained(tmp_path / "merged")

    hf = AutoModelForCausalLM.from_pretrained(folders["qwen3"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().state_dict()
    mine = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(mine) == set(merged)
    for name, t in mine.items():
        assert rel_err(t, merged[name]) < 1e-6, name


def test_init_frozen_base_and_load_adapter(folders, generator, tmp_path):
    torch.manual_seed(0)
    lora = LoraConfig(rank=8, alpha=16, target_modules=("k_proj", "up_proj"))
    ours = load_pretrained(folders["llama"], dtype=torch.float32, lora=lora)
    base = load_pretrained(folders["llama"], dtype=torch.float32)
    ids, labels, pos, _ = packed_inputs(generator, [[16]])
    assert rel_err(ours(ids, pos), base(ids, pos)) == 0.0  # B = 0: a fresh adapter changes nothing
    layer = ours.model.layers[1]
    a, b = layer.adapter("up_proj")
    assert a.shape == (8, 64) and b.shape == (96, 8) and not b.any()
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as peft
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound and a.std() > 0.4 * bound
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    assert [n for n, _ in ours.trainable_parameters()] == [
        f"model.layers.{i}.{m}.lora_{x}.weight" for i in range(2)
        for m in ("self_attn.k_proj", "mlp.up_proj") for x in "AB"]  # fmt: skip
    ours.loss(ids, labels, pos).backward()
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)

    randomise_lora_b(ours, generator=generator)
    ours.save_adapter(tmp_path)
    other = load_pretrained(folders["llama"], dtype=torch.float32, lora=LoraConfig(rank=2))
    other.load_adapter(tmp_path)
    assert other.lora_config == lora
    assert rel_err(other(ids, pos), ours(ids, pos)) == 0.0


def test_rslora_scale():
    assert LoraConfig(rank=16, alpha=32).scale == 2.0
    assert LoraConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": ("q_proj", "lm_head")}, "lm_head"),
])  # fmt: skip
def test_bad_lora_config(kwargs, match):
    with pytest.raises(ModelError, match=match):
        LoraConfig(**kwargs)


def test_projection_backward_with_dropout_matches_autograd(generator):
    """The hand-written LoRA backward (two adapters on row slices, dropout masks) against torch autograd."""
    tokens, fan_in, r, p, scale = 11, 24, 3, 0.3, 1.7
    x = torch.randn(tokens, fan_in, generator=generator, dtype=torch.float64)
    w = torch.randn(20, fan_in, generator=generator, dtype=torch.float64)
    bias = torch.randn(20, generator=generator, dtype=torch.float64)
    loras = [Lora(rows, torch.randn(r, fan_in, generator=generator, dtype=torch.float64),
                  torch.randn(rows.stop - rows.start, r, generator=generator, dtype=torch.float64),
                  torch.rand(tokens, fan_in, generator=generator) >= p)
             for rows in (slice(0, 8), slice(12, 20))]  # fmt: skip
    dy = torch.randn(tokens, 20, generator=generator, dtype=torch.float64)
    y, us = projection_forward(x, w, bias, loras, scale, p)
    dx, dw, db, grads = projection_backward(dy, x, w, loras, us, scale, p, True, True, True, [(True, True)] * 2)

    leaves = [t.clone().requires_grad_() for t in (x, w, bias, *[t for lo in loras for t in (lo.A, lo.B)])]
    xg, wg, bg, a0, b0, a1, b1 = leaves
    ref = xg @ wg.t() + bg
    parts = [ref[:, 0:8], ref[:, 8:12], ref[:, 12:20]]
    for k, (lo, a, b) in enumerate(((loras[0], a0, b0), (loras[1], a1, b1))):
        dropped = xg * lo.mask / (1 - p)
        parts[2 * k] = parts[2 * k] + scale * (dropped @ a.t()) @ b.t()
    ref = torch.cat(parts, dim=1)
    ref.backward(dy)
    assert rel_err(y, ref) < 1e-12
    for mine, leaf in zip((dx, dw, db, grads[0][0], grads[0][1], grads[1][0], grads[1][1]), leaves, strict=True):
        assert rel_err(mine, leaf.grad) < 1e-12


def test_dropout_only_in_training(folders, generator):
    ours = load_pretrained(folders["qwen2"], dtype=torch.float32, lora=LoraConfig(rank=4, dropout=0.5))
    randomise_lora_b(ours, generator=generator)
    ids, labels, pos, _ = packed_inputs(generator, [[16]])
    ours.eval()
    evaluated = ours.loss(ids, labels, pos).item()
    assert ours.loss(ids, labels, pos).item() == evaluated
    ours.train()
    assert ours.loss(ids, labels, pos).item() != evaluated
