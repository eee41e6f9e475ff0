"""Recompute flags: parsing and implications, and every combination gives exactly the loss and gradients of
no recompute (full fine-tune, and LoRA with dropout)."""

import itertools

import pytest
import torch
from tiny_hf import hf_model, packed_inputs, randomise_lora_b

from surogate.models import LoraConfig, ModelError, load_pretrained
from surogate.models._recompute import Recompute

FLAGS = ("block", "att", "ffn", "qkv", "swiglu", "rmsnorm")


def test_parse_and_implications():
    assert Recompute.parse(None) == Recompute() == Recompute.parse("none")
    assert Recompute.parse("block") == Recompute(True, True, True, True, True, True)
    assert Recompute.parse("att") == Recompute(att=True, qkv=True)
    assert Recompute.parse({"recompute_ffn": True, "recompute_att": False}) == Recompute(ffn=True, swiglu=True)
    assert Recompute.parse("qkv, rmsnorm") == Recompute(qkv=True, rmsnorm=True)
    r = Recompute.parse("att")
    assert not r.keep_ln1 and r.keep_ln2 and not r.keep_qkv and not r.keep_attention and r.keep_gate_up
    with pytest.raises(ModelError, match="unknown flag 'mlp'"):
        Recompute.parse("mlp")
    with pytest.raises(ModelError, match="unknown flag 'recompute_attn'"):
        Recompute.parse({"recompute_attn": True})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    hf_model("qwen3", seed=7, num_hidden_layers=3).save_pretrained(path)  # QK-norm: the most state to rebuild
    return path


def _run(folder, spec, inputs, lora=None):
    torch.manual_seed(1234)  # same LoRA init and the same dropout masks in every run
    model = load_pretrained(folder, dtype=torch.float32, lora=lora, recompute=spec)
    if lora is not None:
        randomise_lora_b(model)
    model.train()
    ids, labels, pos = inputs
    loss = model.loss(ids, labels, pos)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b, spec):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.equal(loss_a, loss_b), spec
    assert grads_a.keys() == grads_b.keys(), spec
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), (spec, n)


def test_every_combination_equals_no_recompute(folder, generator):
    ids, labels, pos, _ = packed_inputs(generator, [[9, 15], [24]])
    base = _run(folder, None, (ids, labels, pos))
    seen = set()
    for bits in itertools.product((False, True), repeat=len(FLAGS)):
        spec = dict(zip(FLAGS, bits, strict=True))
        seen.add(Recompute.parse(spec))
        _same(base, _run(folder, spec, (ids, labels, pos)), spec)
    assert len(seen) > 10  # the implications collapse 64 combinations to the distinct behaviours tested


@pytest.mark.parametrize("spec", ["rmsnorm", "qkv", "att", "swiglu", "ffn", "block"])
def test_lora_with_dropout_equals_no_recompute(spec, folder, generator):
    ids, labels, pos, _ = packed_inputs(generator, [[9, 15]])
    lora = LoraConfig(rank=4, alpha=8, dropout=0.25)
    _same(_run(folder, None, (ids, labels, pos), lora), _run(folder, spec, (ids, labels, pos), lora), spec)


def test_block_recompute_skips_the_down_projection(folder, generator, monkeypatch):
    """recompute_block's rerun leaves out the MLP's down GEMM (backward never reads its output): per layer the MLP
    projects twice in forward (gate_up, down) and once in backward (gate_up); the numbers are the same as above."""
    from surogate.models.blocks import mlp

    calls = []
    real = mlp.projection_forward

    def counting(x, weight, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(mlp, "projection_forward", counting)
    ids, labels, pos, _ = packed_inputs(generator, [[9, 15], [24]])
    _run(folder, "block", (ids, labels, pos))
    layers = 3
    gate_up = [c for c in calls if c[0] > c[1]]  # [2 * intermediate, hidden]
    assert len(calls) == 3 * layers and len(gate_up) == 2 * layers, calls
