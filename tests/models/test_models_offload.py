"""offload_residual on CPU (host-to-host copies, the code path the CUDA one shares): with recompute_block the loss and
every gradient equal those without offloading bit for bit (full fine-tune, LoRA with dropout, packed documents,
gradient accumulation over micro-batches of different sizes); backward really reads the host copies; the device keeps
one layer's tensors, not one per layer; misuse is a clear ModelError."""

import pytest
import torch
from tiny_hf import hf_model, packed_inputs, randomise_lora_b

from surogate.kernels.testing import rel_err
from surogate.models import LoraConfig, ModelError, init_model, load_pretrained

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
        randomise_lora_b(model)
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
    assert model.offloaded_bytes() == host_bytes and clean.offloaded_bytes() == LAYERS * h_bytes
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


# ------------------------------------------------------------------------------------------ GPU (H100)
GPU_CONFIG = dict(architectures=["Qwen3ForCausalLM"], hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000)


def _gpu_model(config, dtype, lora, offload):
    torch.manual_seed(0)  # the LoRA A init
    model = init_model(config, dtype=dtype, device="cuda", seed=3, lora=lora, recompute="block",
                       offload_residual=offload)
    if lora is not None:  # B off zero (seeded: both models get the same adapters)
        randomise_lora_b(model, 0.05, torch.Generator().manual_seed(1))
    model.train()
    return model


class _Step:
    """forward + backward on static inputs (device cu_seqlens: no host sync), grads read and zeroed by take()."""

    def __init__(self, model, ids, labels, pos, cu):
        self.model, self.ids, self.labels, self.pos, self.cu = model, ids, labels, pos, cu
        self.params = [p for _, p in model.trainable_parameters()]
        self.loss = torch.zeros((), device="cuda")

    def __call__(self):
        loss = self.model.loss(self.ids, self.labels, self.pos, cu_seqlens=self.cu)
        loss.backward()
        self.loss.copy_(loss.detach())

    def take(self):
        grads = torch.cat([p.grad.float().reshape(-1) for p in self.params])
        for p in self.params:
            p.grad.zero_()
        return self.loss.clone(), grads

    def capture(self):
        """As surogate.cli.step.TrainStep: warm up on a side stream (allocates the .grad tensors and the offload
        buffers), then capture on torch.cuda.graph's stream."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self()
        torch.cuda.current_stream().wait_stream(side)
        self.take()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self()
        self.take()
        return graph


def _gpu_inputs(generator, vocab):
    ids, labels, pos, _ = packed_inputs(generator, [[40, 88], [128]], vocab=vocab)
    cu = torch.tensor([0, 40, 128, 256], dtype=torch.int32, device="cuda")
    return ids.cuda(), labels.cuda(), pos.cuda(), cu


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [None, LoraConfig(rank=8, alpha=16)], ids=["full", "lora"])
def test_gpu_offload_equals_recompute_block_eager_and_captured(generator, dtype, lora):
    """recompute_block + offload_residual vs recompute_block alone on CUDA: eager, and replayed as a captured CUDA
    graph (side-stream copies joined by events), twice, and again after new inputs were copied into the static
    ones. fp32 (reference attention, deterministic kernels): bit for bit. bf16: the loss bit for bit (the forward is
    deterministic); the gradients within what eager differs from itself (FlashAttention's backward accumulates dq
    with atomics in a run-dependent order)."""
    ids, labels, pos, cu = _gpu_inputs(generator, GPU_CONFIG["vocab_size"])
    plain = _Step(_gpu_model(GPU_CONFIG, dtype, lora, False), ids, labels, pos, cu)
    off = _Step(_gpu_model(GPU_CONFIG, dtype, lora, True), ids.clone(), labels.clone(), pos.clone(), cu.clone())
    plain()
    reference = plain.take()
    plain()
    again = plain.take()
    noise = rel_err(again[1], reference[1])

    def check(result, truth, what):
        assert torch.equal(result[0], truth[0]), (what, result[0], truth[0])
        if dtype == torch.float32:
            assert torch.equal(result[1], truth[1]), what
        else:
            assert rel_err(result[1], truth[1]) <= 4 * noise + 1e-3, (what, rel_err(result[1], truth[1]), noise)

    off()
    check(off.take(), reference, "eager")
    assert not off.model._offload.pending  # every layer was loaded back
    graph = off.capture()
    for replay in range(2):
        graph.replay()
        torch.cuda.synchronize()
        check(off.take(), reference, f"replay {replay}")
    new_ids, new_labels, _, _ = packed_inputs(generator, [[40, 88], [128]], vocab=GPU_CONFIG["vocab_size"])
    for step in (plain, off):
        step.ids.copy_(new_ids)
        step.labels.copy_(new_labels)
    plain()
    graph.replay()
    torch.cuda.synchronize()
    check(off.take(), plain.take(), "replay on new inputs")


@pytest.mark.gpu
def test_gpu_offload_peak_memory_drops(generator):
    """bf16 LoRA, 16 layers of hidden 1024, 2 x 2048 tokens: recompute_block keeps one residual per layer (8 MiB
    each); with offload_residual the device holds the last layer's, the 3-slot staging ring and the one in flight:
    the peak must drop by at least (layers - 5) residuals. Prints both peaks and step times."""
    import time

    config = dict(GPU_CONFIG, hidden_size=1024, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=64, vocab_size=32000)
    ids, labels, pos, _ = packed_inputs(generator, [[700, 1348], [2048]], vocab=config["vocab_size"])
    ids, labels, pos = ids.cuda(), labels.cuda(), pos.cuda()
    h_bytes = ids.numel() * config["hidden_size"] * 2
    peaks = {}
    for offload in (False, True):
        model = _gpu_model(config, torch.bfloat16, LoraConfig(rank=16, alpha=32), offload)
        model.loss(ids, labels, pos).backward()  # warm-up: kernels compiled, buffers allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(3):
            model.loss(ids, labels, pos).backward()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / 3 * 1e3
        peaks[offload] = torch.cuda.max_memory_allocated()
        print(f"\nrecompute_block, offload_residual={offload}: peak {peaks[offload] / 2**30:.3f} GiB, {ms:.1f} ms/step "
              "(eager)")
        del model
        torch.cuda.empty_cache()
    layers = config["num_hidden_layers"]
    assert peaks[True] <= peaks[False] - (layers - 5) * h_bytes, (peaks, h_bytes)
