import pytest
import torch

from surogate.kernels import bias_grad
from surogate.kernels.ops import bias_grad as op
from surogate.kernels.testing import assert_close, randn


def float64_truth(x, bias, dy):
    """d(bias) of y = x + bias by float64 autograd."""
    b = bias.double().requires_grad_()
    (x.double() + b).backward(dy.double())
    return b.grad


def check(fn, shape, dtype, generator, device="cpu"):
    dy = randn(*shape, dtype=dtype, generator=generator).to(device)
    x = randn(*shape, dtype=dtype, generator=generator)
    bias = randn(shape[-1], dtype=dtype, generator=generator)
    db = fn(dy)
    assert db.dtype == dtype and db.shape == (shape[-1],)
    # sums of up to 4096 values in fp32: error ~ sqrt(rows) ulps; 2x covers it at fp32
    assert_close(db, float64_truth(x, bias, dy.cpu()), dtype, "dbias", factor=2.0)


@pytest.mark.parametrize("shape", [(1, 3), (7, 37), (2, 50, 1152), (300, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(shape, dtype, generator):
    check(op.reference, shape, dtype, generator)


@pytest.mark.sim
@pytest.mark.parametrize("shape", [(19, 40), (5, 7), (2, 9, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_simulator(shape, dtype, generator):
    check(op.forward, shape, dtype, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("n_cols", [1152, 2560, 4608, 5120 + 2 * 1024, 4099])  # Qwen2 0.5B, 3B, 7B, 14B q|k|v
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(n_cols, dtype, generator):
    check(bias_grad, (4096, n_cols), dtype, generator, device="cuda")
