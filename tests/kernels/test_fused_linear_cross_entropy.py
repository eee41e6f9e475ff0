import pytest
import torch
import torch.nn.functional as F

from surogate.kernels import fused_linear_cross_entropy
from surogate.kernels.ops import fused_linear_cross_entropy as flce
from surogate.kernels.testing import assert_close, randn
from surogate.kernels.torch import LinearCrossEntropyLoss

IGNORE = -100


def float64_truth(hidden, weight, targets, grad_scale):
    """Summed loss, valid count and gradients (times grad_scale) by float64 autograd."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), targets.long(), ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return loss.detach(), (targets != IGNORE).sum(), h.grad * grad_scale, w.grad * grad_scale


def inputs(rows, n_cols, vocab, dtype, generator, ignored=(), device="cpu"):
    hidden = randn(rows, n_cols, dtype=dtype, generator=generator).to(device)
    weight = randn(vocab, n_cols, dtype=dtype, generator=generator, scale=n_cols**-0.5 * 2).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    for r in ignored:
        targets[r] = IGNORE
    return hidden, weight, targets.to(device)


def check(fn, rows, n_cols, vocab, dtype, generator, ignored=(), chunk_rows=None, device="cpu", weight_grad=True):
    hidden, weight, targets = inputs(rows, n_cols, vocab, dtype, generator, ignored, device)
    scale = torch.tensor(0.5, device=device)
    loss, n, d_hidden, d_weight = fn(hidden, weight, targets, IGNORE, scale, chunk_rows, weight_grad)
    loss64, n64, dh64, dw64 = float64_truth(hidden, weight, targets, 0.5)
    assert loss.shape == () and loss.dtype == torch.float32 and int(n) == int(n64)
    assert d_hidden.dtype == dtype and d_hidden.shape == hidden.shape
    # bf16: the logits are rounded to bf16 before the loss (as in every bf16 lm_head), and dlogits before the GEMMs
    assert_close(loss, loss64, dtype, "loss_sum")
    assert_close(d_hidden, dh64, dtype, "d_hidden")
    if weight_grad:
        assert d_weight.dtype == torch.float32
        assert_close(d_weight, dw64, dtype, "d_weight")
    else:
        assert d_weight is None


@pytest.mark.parametrize("rows,n_cols,vocab,ignored,chunk_rows", [
    (13, 24, 37, (2, 3), 4),  # ragged last chunk, odd vocab
    (8, 16, 64, (), None),  # one chunk
    (6, 8, 50, range(6), 2),  # every target ignored
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(rows, n_cols, vocab, ignored, chunk_rows, dtype, generator):
    check(flce.reference, rows, n_cols, vocab, dtype, generator, ignored, chunk_rows)


def test_public_function_on_cpu_without_weight_grad(generator):
    check(fused_linear_cross_entropy, 9, 12, 30, torch.float32, generator, ignored=(0,), chunk_rows=5,
          weight_grad=False)


def test_default_chunk_fits_the_budget():
    rows = flce.default_chunk_rows(4096, 151936, 2)
    assert rows == 824 and rows * 151936 * 2 <= flce.CHUNK_BYTES
    assert flce.default_chunk_rows(100, 1000, 4) == 100  # small problems run in one chunk
    assert flce.default_chunk_rows(3, 1 << 30, 4) == 1


def test_rejects_mismatched_inputs(generator):
    hidden, weight, targets = inputs(4, 8, 10, torch.float32, generator)
    with pytest.raises(TypeError, match="float32 or both bfloat16"):
        fused_linear_cross_entropy(hidden, weight.bfloat16(), targets)
    with pytest.raises(ValueError, match="lm_head"):
        fused_linear_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="one id per hidden row"):
        fused_linear_cross_entropy(hidden, weight, targets[:3])


def test_module_mean_matches_float64(generator):
    hidden, weight, targets = inputs(10, 16, 33, torch.float32, generator, ignored=(1, 7))
    h = hidden.clone().reshape(2, 5, 16).requires_grad_()
    w = weight.clone().requires_grad_()
    loss = LinearCrossEntropyLoss(ignore_index=IGNORE, chunk_rows=3)(h, w, targets.reshape(2, 5))
    loss.backward(torch.tensor(3.0))
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    loss64 = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=IGNORE)
    loss64.backward(torch.tensor(3.0, dtype=torch.float64))
    assert_close(loss, loss64, torch.float32, "mean loss")
    assert_close(h.grad.reshape(10, 16), h64.grad, torch.float32, "d_hidden")
    assert_close(w.grad, w64.grad, torch.float32, "d_weight")


@pytest.mark.sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_simulator(dtype, generator):
    check(flce.forward, 5, 8, 52, dtype, generator, ignored=(3,), chunk_rows=2)


@pytest.mark.gpu
@pytest.mark.parametrize("n_cols", [1024, 2048])
@pytest.mark.parametrize("fp32_addmm", [True, False])
def test_kernel_on_gpu(n_cols, fp32_addmm, generator, monkeypatch):
    if not fp32_addmm:  # force the vocab-slice fallback for d_weight
        monkeypatch.setitem(flce._addmm_to_fp32, "cuda", False)
    check(fused_linear_cross_entropy, 4096, n_cols, 151936, torch.bfloat16, generator,
          ignored=range(0, 4096, 5), device="cuda")


@pytest.mark.gpu
def test_peak_memory_on_gpu(generator):
    """One chunk of bf16 logits, not [rows, V] in fp32: compare with the naive fp32-logits loss."""
    rows, n_cols, vocab = 4096, 2048, 151936
    hidden, weight, targets = inputs(rows, n_cols, vocab, torch.bfloat16, generator, device="cuda")

    def peak_extra(fn):
        fn()  # warm up (kernels compiled, cuBLAS workspace allocated)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base

    def naive():
        h = hidden.clone().requires_grad_()
        loss = F.cross_entropy((h @ weight.t()).float(), targets, reduction="sum")
        loss.backward()
        return h.grad

    ours = peak_extra(lambda: fused_linear_cross_entropy(hidden, weight, targets))
    baseline = peak_extra(naive)
    d_hidden_bytes = rows * n_cols * 2
    print(f"peak extra: fused {ours / 2**20:.0f} MiB, naive fp32 logits {baseline / 2**20:.0f} MiB")
    assert ours <= flce.CHUNK_BYTES + d_hidden_bytes + 64 * 2**20
    assert ours * 8 < baseline
