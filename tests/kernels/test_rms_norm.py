import pytest
import torch

from surogate.kernels.ops import rms_norm
from surogate.kernels.testing import assert_close, randn
from surogate.kernels.torch import RMSNorm

EPS = 1e-6


def float64_truth(x, w, dy):
    """RMSNorm forward and gradients by float64 autograd, independent of the hand-written backward."""
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w64
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad


def inputs(rows, cols, dtype, generator, device="cpu"):
    x = randn(rows, cols, dtype=dtype, generator=generator).to(device)
    w = (1 + 0.1 * randn(cols, generator=generator)).to(dtype).to(device)
    dy = randn(rows, cols, dtype=dtype, generator=generator).to(device)
    return x, w, dy


def check(forward, backward, rows, cols, dtype, generator, device="cpu"):
    x, w, dy = inputs(rows, cols, dtype, generator, device)
    y, rstd = forward(x, w, EPS)
    dx, dw = backward(dy, x, w, rstd)
    y64, dx64, dw64 = float64_truth(x.cpu(), w.cpu(), dy.cpu())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(dx, dx64, dtype, "dx")
    # dw sums `rows` products: fp32 accumulation error grows ~sqrt(rows) ulps; 2x covers rows <= 4096.
    assert_close(dw, dw64, dtype, "dweight", factor=2.0)


@pytest.mark.parametrize("rows,cols", [(1, 3), (7, 37), (64, 1024), (33, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(rows, cols, dtype, generator):
    check(rms_norm.reference_forward, rms_norm.reference_backward, rows, cols, dtype, generator)


def test_module_matches_float64_autograd(generator):
    x, w, dy = inputs(5, 48, torch.float32, generator)
    norm = RMSNorm(48, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(w)
    xg = x.clone().requires_grad_()
    y = norm(xg)
    y.backward(dy)
    y64, dx64, dw64 = float64_truth(x, w, dy)
    assert_close(y, y64, torch.float32, "y")
    assert_close(xg.grad, dx64, torch.float32, "dx")
    assert_close(norm.weight.grad, dw64, torch.float32, "dweight")


@pytest.mark.sim
# 45: one value per load; 5 rows: in the simulator's backward grid (2 blocks of 2 row slots, or of 1 slot from 264
# columns) a block takes several rounds and a slot idles in the last one; 264: lanes past the row end
@pytest.mark.parametrize("rows,cols", [(3, 45), (2, 64), (5, 24), (5, 264)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_simulator(rows, cols, dtype, generator):
    check(rms_norm.forward, rms_norm.backward, rows, cols, dtype, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [1024, 2048, 2560, 4096, 8192, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(cols, dtype, generator):
    check(rms_norm.forward, rms_norm.backward, 4096, cols, dtype, generator, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(1037, 1024), (1, 2048), (77, 2560)])
def test_kernel_on_gpu_odd_rows(rows, cols, generator):
    """Row counts that leave row slots of the backward idle in the last round."""
    check(rms_norm.forward, rms_norm.backward, rows, cols, torch.bfloat16, generator, device="cuda")


@pytest.mark.gpu
def test_module_on_gpu_matches_cpu(generator):
    x, w, dy = inputs(300, 1000, torch.bfloat16, generator)
    norm = RMSNorm(1000, eps=EPS, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w)
    xg = x.cuda().requires_grad_()
    norm(xg).backward(dy.cuda())
    y64, dx64, dw64 = float64_truth(x, w, dy)
    assert_close(xg.grad, dx64, torch.bfloat16, "dx")
    assert_close(norm.weight.grad, dw64, torch.bfloat16, "dweight")
