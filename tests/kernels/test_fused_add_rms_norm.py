import pytest
import torch

from surogate.kernels import fused_add_rms_norm_backward, fused_add_rms_norm_forward
from surogate.kernels.ops import fused_add_rms_norm
from surogate.kernels.testing import assert_close, randn
from surogate.kernels.torch import FusedAddRMSNorm

EPS = 1e-6


def float64_truth(residual, x, w, dy, dh):
    """y, h and the gradients of <y, dy> + <h, dh> by float64 autograd of the plain formula."""
    r64 = residual.double().requires_grad_()
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    h = r64 + x64
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w64
    loss = (y * dy.double()).sum()
    if dh is not None:
        loss = loss + (h * dh.double()).sum()
    loss.backward()
    assert torch.equal(r64.grad, x64.grad)
    return y.detach(), h.detach(), x64.grad, w64.grad


def inputs(rows, cols, dtype, generator, device="cpu"):
    residual = randn(rows, cols, dtype=dtype, generator=generator, scale=2.0).to(device)
    x = randn(rows, cols, dtype=dtype, generator=generator).to(device)
    w = (1 + 0.1 * randn(cols, generator=generator)).to(dtype).to(device)
    dy = randn(rows, cols, dtype=dtype, generator=generator).to(device)
    dh = randn(rows, cols, dtype=dtype, generator=generator).to(device)
    return residual, x, w, dy, dh


def check(forward, backward, rows, cols, dtype, generator, device="cpu", with_dh=True):
    residual, x, w, dy, dh = inputs(rows, cols, dtype, generator, device)
    if not with_dh:
        dh = None
    y, h, rstd = forward(residual, x, w, EPS)
    dh_total, dw = backward(dy, dh, h, w, rstd)
    y64, h64, d64, dw64 = float64_truth(residual.cpu(), x.cpu(), w.cpu(), dy.cpu(), None if dh is None else dh.cpu())
    assert y.dtype == dtype and h.dtype == dtype and dh_total.dtype == dtype and dw.dtype == dtype
    assert rstd.dtype == torch.float32 and rstd.shape == (rows,)
    exact_sum = (residual.cpu().double() + x.cpu().double()).to(dtype)
    assert torch.equal(h.cpu(), exact_sum), "h = residual + x, rounded once"
    assert_close(h, h64, dtype, "h")
    assert_close(y, y64, dtype, "y")
    assert_close(dh_total, d64, dtype, "dh_total")
    # dw sums `rows` products: fp32 accumulation error grows ~sqrt(rows) ulps; 2x covers rows <= 4096.
    assert_close(dw, dw64, dtype, "dweight", factor=2.0)


@pytest.mark.parametrize("rows,cols", [(1, 3), (7, 37), (64, 1024), (33, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(rows, cols, dtype, generator):
    check(fused_add_rms_norm.reference_forward, fused_add_rms_norm.reference_backward, rows, cols, dtype, generator)


def test_reference_without_dh(generator):
    check(fused_add_rms_norm.reference_forward, fused_add_rms_norm.reference_backward, 9, 40, torch.float32,
          generator, with_dh=False)


def test_public_functions_keep_batch_dims(generator):
    residual, x, w, dy, dh = inputs(6, 16, torch.float32, generator)
    y, h, rstd = fused_add_rms_norm_forward(residual.view(2, 3, 16), x.view(2, 3, 16), w, EPS)
    dh_total, dw = fused_add_rms_norm_backward(dy.view(2, 3, 16), dh.view(2, 3, 16), h, w, rstd)
    assert y.shape == h.shape == dh_total.shape == (2, 3, 16) and rstd.shape == (6,)
    y64, _, d64, dw64 = float64_truth(residual, x, w, dy, dh)
    assert_close(y.reshape(6, 16), y64, torch.float32, "y")
    assert_close(dh_total.reshape(6, 16), d64, torch.float32, "dh_total")


def test_bad_inputs_raise():
    x = torch.ones(2, 8)
    with pytest.raises(ValueError, match="residual must be"):
        fused_add_rms_norm.forward(torch.ones(2, 7), x, torch.ones(8), EPS)
    with pytest.raises(ValueError, match="weight must be"):
        fused_add_rms_norm.forward(x, x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match="dh must be"):
        fused_add_rms_norm.backward(x, torch.ones(2, 8, dtype=torch.bfloat16), x, torch.ones(8), torch.ones(2))


def test_module_matches_float64_autograd(generator):
    residual, x, w, dy, dh = inputs(5, 48, torch.float32, generator)
    norm = FusedAddRMSNorm(48, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(w)
    rg = residual.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    y, h = norm(rg, xg)
    ((y * dy).sum() + (h * dh).sum()).backward()
    y64, h64, d64, dw64 = float64_truth(residual, x, w, dy, dh)
    assert_close(y, y64, torch.float32, "y")
    assert_close(h, h64, torch.float32, "h")
    assert_close(rg.grad, d64, torch.float32, "d residual")
    assert_close(xg.grad, d64, torch.float32, "dx")
    assert_close(norm.weight.grad, dw64, torch.float32, "dweight")


def test_module_with_only_y_used(generator):
    residual, x, w, dy, _ = inputs(4, 20, torch.float32, generator)
    norm = FusedAddRMSNorm(20, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(w)
    xg = x.clone().requires_grad_()
    y, _ = norm(residual, xg)
    y.backward(dy)
    _, _, d64, _ = float64_truth(residual, x, w, dy, None)
    assert_close(xg.grad, d64, torch.float32, "dx")


@pytest.mark.sim
# 45: one value per load; 5 rows: blocks take several rounds of the backward (see test_rms_norm)
@pytest.mark.parametrize("rows,cols,with_dh", [(3, 45, True), (2, 64, True), (2, 20, False), (5, 264, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_simulator(rows, cols, with_dh, dtype, generator):
    check(fused_add_rms_norm.forward, fused_add_rms_norm.backward, rows, cols, dtype, generator, with_dh=with_dh)


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [1024, 2048, 2560, 4096, 8192, 4099])  # Qwen3 0.6B..8B hidden sizes, 8192, odd
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(cols, dtype, generator):
    check(fused_add_rms_norm.forward, fused_add_rms_norm.backward, 4096, cols, dtype, generator, device="cuda")


@pytest.mark.gpu
def test_kernel_on_gpu_without_dh(generator):
    check(fused_add_rms_norm.forward, fused_add_rms_norm.backward, 4096, 2048, torch.bfloat16, generator,
          device="cuda", with_dh=False)
