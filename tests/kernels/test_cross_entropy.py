import pytest
import torch
import torch.nn.functional as F

from surogate.kernels import cross_entropy_forward_backward, cross_entropy_loss
from surogate.kernels.ops import cross_entropy
from surogate.kernels.testing import TOLERANCE, assert_close, randn
from surogate.kernels.torch import CrossEntropyLoss

IGNORE = -100


def float64_truth(logits, targets, grad_scale=1.0):
    """Summed loss, valid count and d(loss_sum)/dlogits * grad_scale by float64 autograd."""
    x = logits.double().requires_grad_()
    loss = F.cross_entropy(x, targets.long(), ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return loss.detach(), (targets != IGNORE).sum(), x.grad * grad_scale


def assert_loss_close(loss, loss64, logits, targets, name="loss_sum"):
    """loss = sum(lse - x[target]) in fp32: the error scales with the magnitudes subtracted, not with the loss (a
    single confident row has a loss near 0 and an error of a few ulps of its lse): allow 32 fp32 ulps of their sum
    (torch's fp32 logsumexp + subtraction: worst 20 ulps measured over 20,000 draws of 1 row x 3 classes; 2e-6
    relative, still 5x tighter than the fp32 tolerance)."""
    x = logits.double().cpu()
    valid = targets.cpu() != IGNORE
    terms = torch.logsumexp(x, -1).abs() + x.gather(1, targets.cpu().clamp(min=0)[:, None])[:, 0].abs()
    bound = 32 * 2.0**-24 * terms[valid].sum().item() + 1e-30
    assert abs(loss.item() - loss64.item()) <= bound, f"{name}: {loss.item()} vs {loss64.item()} (bound {bound:.2e})"


def assert_grad_close(dlogits, grad64, dtype, grad_scale, n_valid, name="dlogits"):
    """Relative-norm check, but never relative to less than grad_scale per valid row: softmax - onehot cancels at the
    target of a confident row (p = 0.999 -> -0.001, an error of one ulp of 1), so a few confident rows would make
    the plain relative error meaningless. Each row of the gradient has norm up to ~sqrt(2) * grad_scale."""
    err = (dlogits.double().cpu() - grad64.cpu()).norm().item()
    scale = max(grad64.norm().item(), abs(float(grad_scale)) * max(int(n_valid), 1) ** 0.5)
    assert err <= TOLERANCE[dtype] * scale, f"{name}: error {err:.3e} > {TOLERANCE[dtype]:.0e} x {scale:.3e} ({dtype})"


def inputs(rows, vocab, dtype, generator, ignored=(), device="cpu"):
    logits = randn(rows, vocab, dtype=dtype, generator=generator, scale=3.0).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    for r in ignored:
        targets[r] = IGNORE
    return logits, targets.to(device)


def check(fwd_bwd, loss_only, rows, vocab, dtype, generator, ignored=(), grad_scale=0.37, device="cpu",
          tensor_scale=False):
    logits, targets = inputs(rows, vocab, dtype, generator, ignored, device)
    loss64, n64, grad64 = float64_truth(logits.cpu(), targets.cpu(), grad_scale)
    original = logits.clone()
    loss0, n0 = loss_only(logits, targets, IGNORE)
    scale = torch.tensor(grad_scale, device=device) if tensor_scale else grad_scale
    loss, n = fwd_bwd(logits, targets, IGNORE, scale)
    assert loss.dtype == torch.float32 and loss.shape == () and n.shape == ()
    assert logits.dtype == dtype
    # the loss is computed in fp32 from the given (already rounded) logits: fp32 bounds for bf16 inputs too
    assert_loss_close(loss, loss64, original, targets)
    assert_loss_close(loss0, loss64, original, targets, "loss_sum (loss only)")
    assert int(n) == int(n64) and int(n0) == int(n64)
    assert_grad_close(logits, grad64, dtype, grad_scale, n64)


CASES = [(1, 3, ()), (7, 37, (2,)), (16, 1000, (0, 5, 15)), (5, 4099, (1,)), (4, 19, (0, 1, 2, 3))]


@pytest.mark.parametrize("rows,vocab,ignored", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(rows, vocab, ignored, dtype, generator):
    check(cross_entropy.reference_forward_backward, cross_entropy.reference_forward, rows, vocab, dtype, generator,
          ignored, tensor_scale=rows % 2 == 0)


def test_reference_accepts_device_scale_and_int32_targets(generator):
    logits, targets = inputs(6, 40, torch.float32, generator, ignored=(3,))
    loss64, _, grad64 = float64_truth(logits, targets, 0.25)
    original = logits.clone()
    loss, n = cross_entropy_forward_backward(logits, targets.int(), IGNORE, torch.tensor(0.25))
    assert_loss_close(loss, loss64, original, targets)
    assert_grad_close(logits, grad64, torch.float32, 0.25, 5)
    assert int(n) == 5


def test_reference_rejects_bad_shapes(generator):
    logits, targets = inputs(4, 10, torch.float32, generator)
    with pytest.raises(ValueError, match="targets must be"):
        cross_entropy_loss(logits, targets[:3])
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy_loss(logits.t(), targets)


def test_module_mean_matches_float64(generator):
    logits, targets = inputs(9, 33, torch.float32, generator, ignored=(4, 8))
    x = logits.clone().requires_grad_()
    loss = CrossEntropyLoss(ignore_index=IGNORE)(x, targets)
    loss.backward(torch.tensor(2.0))
    x64 = logits.double().requires_grad_()
    loss64 = F.cross_entropy(x64, targets, ignore_index=IGNORE)
    loss64.backward(torch.tensor(2.0, dtype=torch.float64))
    assert_close(loss, loss64, torch.float32, "mean loss")
    assert_close(x.grad, x64.grad, torch.float32, "dlogits")


@pytest.mark.sim
@pytest.mark.parametrize("rows,vocab,ignored", [(3, 50, (1,)), (2, 100, ()), (2, 7, (0, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_simulator(rows, vocab, ignored, dtype, generator):
    check(cross_entropy.forward_backward, cross_entropy.forward, rows, vocab, dtype, generator, ignored,
          tensor_scale=vocab == 100)


@pytest.mark.sim
def test_kernel_out_of_range_target_gives_nan_in_simulator(generator):
    logits, targets = inputs(2, 20, torch.float32, generator)
    targets[1] = 20
    loss, n = cross_entropy.forward(logits, targets)
    assert torch.isnan(loss) and int(n) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [151936, 128256, 32001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(vocab, dtype, generator):
    rows = 4096
    logits, targets = inputs(rows, vocab, dtype, generator, ignored=range(0, rows, 7), device="cuda")
    x64 = logits.double().requires_grad_()
    loss64 = F.cross_entropy(x64, targets, ignore_index=IGNORE, reduction="sum")
    loss64.backward()
    grad64 = x64.grad * 0.5
    original = logits.clone()
    loss0, _ = cross_entropy_loss(logits, targets)
    loss, n = cross_entropy_forward_backward(logits, targets, IGNORE, torch.tensor(0.5, device="cuda"))
    assert_loss_close(loss, loss64, original, targets)
    assert_loss_close(loss0, loss64, original, targets, "loss_sum (loss only)")
    assert int(n) == int((targets != IGNORE).sum())
    assert_grad_close(logits, grad64, dtype, 0.5, n)
