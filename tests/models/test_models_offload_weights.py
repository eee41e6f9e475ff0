"""offload_weights on CPU (host-to-host copies, the code path the CUDA one shares): LoRA with the frozen base weights
streamed a layer at a time through the ring of slots gives the loss and every adapter gradient of the same model with
its weights in place, bit for bit (with and without recompute_block, with offload_residual, dropout, accumulation,
evaluation in between); the parameters are placeholders; misuse is a clear ModelError."""

import pytest
import torch
from test_models_offload import _steps
from tiny_hf import hf_model, packed_inputs, randomise_lora_b

from surogate.models import LoraConfig, ModelError, load_pretrained
from surogate.models._host_weights import RING

LAYERS = 5  # more layers than slots: the ring wraps in forward and in backward


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    hf_model("qwen3", seed=13, num_hidden_layers=LAYERS).save_pretrained(path)
    return path


def _model(folder, streamed, recompute=None, dropout=0.0, offload_residual=False):
    torch.manual_seed(99)  # same LoRA init and the same dropout masks in every run
    model = load_pretrained(folder, dtype=torch.float32, lora=LoraConfig(rank=4, alpha=8, dropout=dropout),
                            recompute=recompute, offload_residual=offload_residual, offload_weights=streamed)
    randomise_lora_b(model)
    model.train()
    return model


def _run(model, batches):
    """Two accumulation windows (test_models_offload's) with an evaluation pass in between: it must not disturb the
    ring. -> (losses, accumulated grads)."""
    first, _ = _steps(model, batches[:1])
    with torch.no_grad():
        model.loss_sum(*batches[0])
    second, grads = _steps(model, batches[1:])
    return torch.cat([first, second]), grads


@pytest.mark.parametrize(("recompute", "dropout", "offload_residual"),
                         [(None, 0.0, False), ("block", 0.0, False), ("block", 0.25, True), (None, 0.25, False)])
def test_streamed_weights_equal_weights_in_place_bitwise(folder, generator, recompute, dropout, offload_residual):
    batches = [packed_inputs(generator, [[9, 15], [24]])[:3], packed_inputs(generator, [[30, 10]])[:3]]
    want = _run(_model(folder, False, recompute, dropout, offload_residual), batches)
    model = _model(folder, True, recompute, dropout, offload_residual)
    got = _run(model, batches)
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys() and got[1]
    for n in want[1]:
        assert torch.equal(got[1][n], want[1][n]), n


def test_base_weights_live_in_host_memory(folder):
    plain, model = _model(folder, False), _model(folder, True)
    streamed = model.host_weights
    layer0 = model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.isnan(layer0).all() and layer0.untyped_storage().nbytes() <= 4  # a placeholder: no memory
    want = plain.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(streamed.host[0][: want.numel()].view(want.shape), want)
    host, slots = streamed.nbytes()
    assert host == sum(4 * sum(m.weight.numel() for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                            layer.mlp.gate_up_proj, layer.mlp.down_proj))
                       for layer in plain.model.layers)
    assert slots == RING * max(h.numel() for h in streamed.host) * 4
    assert model.offloaded_bytes() == host and plain.offloaded_bytes() == 0
    assert "in host memory (offload_weights" in model.memory_report().description


def test_misuse_is_a_model_error(folder):
    with pytest.raises(ModelError, match="LoRA training"):
        load_pretrained(folder, dtype=torch.float32, offload_weights=True)
    with pytest.raises(ModelError, match="QLoRA nf4"):
        load_pretrained(folder, dtype=torch.float32, lora=LoraConfig(rank=4, alpha=8), qlora="nf4",
                        offload_weights=True)
    model = _model(folder, True)
    with pytest.raises(ModelError, match="already come from a provider"):
        model.set_offload_weights()
    with pytest.raises(ModelError, match="save_adapter"):  # the base weights are placeholders here
        model.merge_lora()


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [None, "block"])
def test_gpu_streamed_weights_eager_and_captured(generator, recompute):
    """bf16 LoRA on CUDA, 6 layers through the ring (side-stream copies joined by events): eager, then
    replayed twice as a captured CUDA graph, against the model with its weights in place. The loss bit for bit (the
    forward is deterministic); the gradients within what eager differs from itself (FlashAttention's backward
    accumulates dq with atomics in a run-dependent order)."""
    from test_models_offload import GPU_CONFIG, _gpu_inputs, _Step

    from surogate.kernels.testing import rel_err
    from surogate.models import init_model

    def build(streamed):
        torch.manual_seed(0)  # the LoRA A init
        model = init_model(GPU_CONFIG, dtype=torch.bfloat16, device="cuda", seed=3, lora=LoraConfig(rank=8, alpha=16),
                           recompute=recompute, offload_weights=streamed)
        randomise_lora_b(model, 0.05, torch.Generator().manual_seed(1))
        return model.train()

    ids, labels, pos, cu = _gpu_inputs(generator, GPU_CONFIG["vocab_size"])
    plain = _Step(build(False), ids, labels, pos, cu)
    streamed = _Step(build(True), ids.clone(), labels.clone(), pos.clone(), cu.clone())
    assert streamed.model.model.layers[0].mlp.down_proj.weight.untyped_storage().nbytes() <= 2
    plain()
    reference = plain.take()
    plain()
    noise = rel_err(plain.take()[1], reference[1])

    def check(result, what):
        assert torch.equal(result[0], reference[0]), (what, result[0], reference[0])
        assert rel_err(result[1], reference[1]) <= 4 * noise + 1e-3, (what, rel_err(result[1], reference[1]), noise)

    streamed()
    check(streamed.take(), "eager")
    graph = streamed.capture()
    for replay in range(2):
        graph.replay()
        torch.cuda.synchronize()
        check(streamed.take(), f"replay {replay}")


def test_a_derived_view_of_a_streamed_weight_cannot_be_saved(folder):
    """A Function that saved w.t() (not the tensor it was given) would read another layer's weights in backward once
    the slot is reused: refused at save time."""
    model = _model(folder, True)
    streamed = model.host_weights
    streamed.begin()
    (w,) = streamed((model.model.layers[0].self_attn.o_proj.weight,))
    with streamed.hooks(), pytest.raises(ModelError, match="Save the weight tensor itself"):
        x = torch.randn(3, w.shape[1], requires_grad=True)
        (x @ w.t().contiguous()).sum()  # matmul saves its operands: a copy is fine
        (x * w[0]).sum()  # a view of the slot is not


def test_saved_outputs_under_the_hooks_are_freed_with_their_graph(folder):
    """A node that saves its own output (exp here; cuDNN attention's inner graph in recompute's forward on the GPU)
    must not be held by the saved-tensor hooks: returning the tensor itself from pack makes a cycle that not even
    gc collects, one leaked activation per layer and step."""
    import weakref

    streamed = _model(folder, True).host_weights
    x = torch.randn(16, requires_grad=True)
    with streamed.hooks():
        y = x.exp()
        ref = weakref.ref(y)
        del y
        assert ref() is None
        z = x.exp()
    z.sum().backward()  # a saved output still comes back for backward
    assert torch.equal(x.grad, x.detach().exp())
