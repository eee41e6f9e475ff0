import pytest
import torch

from surogate.kernels import swiglu_backward, swiglu_forward
from surogate.kernels.ops import swiglu
from surogate.kernels.testing import assert_close, randn
from surogate.kernels.torch import SwiGLU, SwiGLUFunction

# Qwen3 0.6B, 1.7B, 4B, 8B intermediate sizes; Llama-3.1-8B's 14336
GPU_INTERMEDIATE = [3072, 6144, 9728, 12288, 14336]


def float64_truth(gate_up, dh):
    """SwiGLU forward and gradient by float64 autograd of the plain formula (F.silu, independent of the kernels)."""
    gu = gate_up.double().requires_grad_()
    gate, up = gu.chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    h.backward(dh.double())
    return h.detach(), gu.grad


def inputs(rows, n, dtype, generator, device="cpu"):
    # scale 3: gates reach the saturated tails of the sigmoid (|g| up to ~15)
    gate_up = randn(rows, 2 * n, dtype=dtype, generator=generator, scale=3.0).to(device)
    dh = randn(rows, n, dtype=dtype, generator=generator).to(device)
    return gate_up, dh


def check(forward, backward, rows, n, dtype, generator, device="cpu"):
    gate_up, dh = inputs(rows, n, dtype, generator, device)
    gate_up_before = gate_up.clone()
    h = forward(gate_up)
    d_gate_up = backward(dh, gate_up)
    h64, d64 = float64_truth(gate_up.cpu(), dh.cpu())
    assert h.dtype == dtype and d_gate_up.dtype == dtype
    assert torch.equal(gate_up, gate_up_before), "gate_up must not be modified"
    assert_close(h, h64, dtype, "h")
    assert_close(d_gate_up[:, :n], d64[:, :n], dtype, "d_gate")
    assert_close(d_gate_up[:, n:], d64[:, n:], dtype, "d_up")


@pytest.mark.parametrize("rows,n", [(1, 1), (7, 37), (64, 1024), (33, 3001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(rows, n, dtype, generator):
    check(swiglu.reference_forward, swiglu.reference_backward, rows, n, dtype, generator)


def test_public_functions_and_batch_dims(generator):
    gate_up = randn(2, 3, 10, generator=generator)
    dh = randn(2, 3, 5, generator=generator)
    h = swiglu_forward(gate_up)
    d = swiglu_backward(dh, gate_up)
    h64, d64 = float64_truth(gate_up.reshape(6, 10), dh.reshape(6, 5))
    assert h.shape == (2, 3, 5) and d.shape == (2, 3, 10)
    assert_close(h.reshape(6, 5), h64, torch.float32, "h")
    assert_close(d.reshape(6, 10), d64, torch.float32, "d_gate_up")


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="2 \\* intermediate_size"):
        swiglu.forward(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="dh must be"):
        swiglu.backward(torch.zeros(3, 4), torch.zeros(3, 6))


def test_module_matches_float64_autograd(generator):
    gate_up, dh = inputs(5, 24, torch.float32, generator)
    gu = gate_up.clone().requires_grad_()
    h = SwiGLU()(gu)
    h.backward(dh)
    h64, d64 = float64_truth(gate_up, dh)
    assert_close(h, h64, torch.float32, "h")
    assert_close(gu.grad, d64, torch.float32, "d_gate_up")
    assert SwiGLUFunction.apply(gate_up).shape == (5, 24)


@pytest.mark.sim
@pytest.mark.parametrize(
    "rows,n,dtype",
    [
        (3, 37, torch.float32),  # odd I: one value per load
        (3, 37, torch.bfloat16),
        (3, 36, torch.bfloat16),  # 8-byte words of 4 bf16
        (2, 1100, torch.float32),  # words of 2 fp32, two column blocks of 256 threads x 2 words (~3 s here)
    ],
)
def test_kernel_in_simulator(rows, n, dtype, generator):
    check(swiglu.forward, swiglu.backward, rows, n, dtype, generator)


@pytest.mark.sim
def test_kernel_misaligned_in_simulator(generator):
    # a view starting 2 bytes into its storage cannot be read as 8-byte words: the one-value path must take it
    gate_up, dh = inputs(2, 36, torch.bfloat16, generator)
    shifted = torch.empty(gate_up.numel() + 1, dtype=torch.bfloat16)[1:].view(gate_up.shape)
    shifted.copy_(gate_up)
    h64, d64 = float64_truth(gate_up, dh)
    assert_close(swiglu.forward(shifted), h64, torch.bfloat16, "h")
    assert_close(swiglu.backward(dh, shifted), d64, torch.bfloat16, "d_gate_up")


@pytest.mark.gpu
@pytest.mark.parametrize("n", GPU_INTERMEDIATE + [3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(n, dtype, generator):
    check(swiglu.forward, swiglu.backward, 4096, n, dtype, generator, device="cuda")


@pytest.mark.gpu
def test_more_rows_than_grid_y_on_gpu(generator):
    # more rows than gridDim.y may hold (65535): the grid is capped and blocks loop over rows
    check(swiglu.forward, swiglu.backward, 70000, 96, torch.bfloat16, generator, device="cuda")
