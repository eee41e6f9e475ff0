"""offload_residual on CPU (host-to-host copies, the code path the CUDA one shares): with recompute_block the loss and
every gradient equal those without offloading bit for bit (full fine-tune, LoRA with dropout, packed documents,
gradient accumulation over micro-batches of different sizes); backward really reads the host copies; the device keeps
one layer's tensors, not one per layer; misuse is a clear ModelError."""

import pytest
import torch
from surogate.models import LoraConfig, ModelError, init_model, load_pretrained
from tiny_hf import hf_model, packed_inputs

LAYERS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    hf_model("qwen3", seed=11, num_hidden_layers=LAYERS).save_pretrained(path)
    return path


def _model(folder, offload, lora=None, dtype=torch.float32):
    torch.manual_seed(4321)  # same LoRA init and the same dropout masks in every run
    model = load_pretrained(folder, dtype=dtype, lora=lora, recompute="block", offload_residual=offload)
    if lora is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape))
    model.train()
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _steps(model, batches):
    """Gradient accumulation: loss_sum / total valid tokens of every micro-batch, one backward each."""
    total = sum(int((labels != -100).sum()) for _, labels, _ in batches)
    losses = []
    for ids, labels, pos in batches:
        loss_sum, _ = model.loss_sum(ids, labels, pos)
        (loss_sum / total).backward()
        losses.append(loss_sum.detach())
    return torch.stack(losses), _grads(model)


def _assert_same(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.equal(loss_a, loss_b), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n


@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4, alpha=8), LoraConfig(rank=4, alpha=8, dropout=0.25)],
                         ids=["full", "lora", "lora-dropout"])
def test_offload_equals_no_offload_bitwise(folder, generator, lora):
    # packed documents; the second micro-batch is smaller than the first and the third larger (buffers are reused,
    # then grown); with dropout the masks are offloaded along with the residual
    batches = [packed_inputs(generator, lengths)[:3] for lengths in ([[9, 15], [24]], [[5, 7]], [[20, 13], [3, 30]])]
    _assert_same(_steps(_model(folder, False, lora), batches), _steps(_model(folder, True, lora), batches))


def test_offload_bf16_lora_equals_no_offload(folder, generator):
    """bf16 tensors travel through the byte buffers unchanged."""
    batches = [packed_inputs(generator, [[11, 21], [32]])[:3]]
    lora = LoraConfig(rank=4, alpha=8)
    _assert_same(_steps(_model(folder, False, lora, torch.bfloat16), batches),
                 _steps(_model(folder, True, lora, torch.bfloat16), batches))


def test_backward_reads_the_host_copies_and_the_device_keeps_one_layer(folder, generator):
    ids, labels, pos, _ = packed_inputs(generator, [[9, 15], [24]])
    clean = _model(folder, True, LoraConfig(rank=4, alpha=8))
    clean.loss(ids, labels, pos).backward()
    model = _model(folder, True, LoraConfig(rank=4, alpha=8))
    loss = model.loss(ids, labels, pos)
    buffers = model._offload
    # forward done: every layer's residual is on the host; only the last layer's tensors are still referenced
    assert list(buffers.pending) == [LAYERS - 1]
    assert len(buffers.host) == LAYERS and all("h" in layer for layer in buffers.host)
    host_bytes, ring_bytes = buffers.nbytes()
    h_bytes = ids.numel() * model.config.hidden_size * 4
    assert host_bytes == LAYERS * h_bytes and ring_bytes == 3 * h_bytes
    buffers.host[0]["h"].view(torch.float32).mul_(1.5)  # layer 0's residual as backward will read it
    loss.backward()
    assert not buffers.pending
    grads, clean_grads = _grads(model), _grads(clean)
    changed = [n for n in grads if not torch.equal(grads[n], clean_grads[n])]
    assert changed and all(".layers.0." in n for n in changed), changed  # layer 0's adapters alone see the change


def test_forward_without_backward_then_eval_then_step(folder, generator):
    """A forward whose graph is dropped, and no_grad evaluation, leave the next step exact."""
    ids, labels, pos, _ = packed_inputs(generator, [[10, 14], [24]])
    lora = LoraConfig(rank=4, alpha=8)
    reference = _model(folder, False, lora)
    reference.loss(ids, labels, pos).backward()
    model = _model(folder, True, lora)
    model.loss(ids, labels, pos)  # dropped
    with torch.no_grad():
        model.eval()
        model.loss(ids, labels, pos)
        model.train()
    model.loss(ids, labels, pos).backward()
    _assert_same((torch.zeros(()), _grads(reference)), (torch.zeros(()), _grads(model)))


def test_two_forwards_before_backward_is_a_clear_error(folder, generator):
    ids, labels, pos, _ = packed_inputs(generator, [[8, 8]])
    model = _model(folder, True, LoraConfig(rank=4, alpha=8))
    first = model.loss(ids, labels, pos)
    second = model.loss(ids, labels, pos)
    with pytest.raises(ModelError, match="second forward pass ran before this backward"):
        (first + second).backward()


def test_needs_recompute_block(folder):
    config = dict(architectures=["Qwen3ForCausalLM"], hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)
    for make in (lambda: load_pretrained(folder, dtype=torch.float32, offload_residual=True),
                 lambda: load_pretrained(folder, dtype=torch.float32, recompute="att,ffn", offload_residual=True),
                 lambda: init_model(config, dtype=torch.float32, offload_residual=True)):
        with pytest.raises(ModelError, match="offload_residual needs recompute_block.*recompute='block'"):
            make()
    model = init_model(config, dtype=torch.float32)
    with pytest.raises(ModelError, match="recompute_block: true"):
        model.set_offload_residual(True)
    model = init_model(config, dtype=torch.float32, recompute="block")
    model.set_offload_residual(True)
    assert model.offload_residual
    model.set_offload_residual(False)
    assert model._offload is None
