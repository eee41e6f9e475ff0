import math

import pytest
import torch

from surogate.kernels import abs_max
from surogate.kernels.ops import abs_max as op
from surogate.kernels.testing import randn


def float64_truth(x):
    return x.double().abs().max()


def check(fn, shape, dtype, generator, device="cpu", plant=None):
    x = randn(*shape, dtype=dtype, generator=generator).to(device)
    if plant is not None:  # a large value of either sign somewhere in the tensor
        flat = x.view(-1)
        flat[plant % flat.numel()] = -1234.5 if plant % 2 else 1234.5
    got = fn(x)
    assert got.shape == () and got.dtype == torch.float32 and got.device == x.device
    assert got.item() == float64_truth(x.cpu()).item()  # a max is exact


@pytest.mark.parametrize("shape", [(1,), (7, 37), (3, 5, 1000), (4099,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(shape, dtype, generator):
    check(op.reference, shape, dtype, generator)


def test_reference_edge_cases():
    assert abs_max(torch.empty(0)).item() == 0.0
    assert math.isnan(abs_max(torch.tensor([1.0, float("nan"), -3.0])).item())
    assert abs_max(torch.tensor([-float("inf"), 2.0])).item() == math.inf


@pytest.mark.sim
@pytest.mark.parametrize("shape,plant", [((5, 20), 37), ((3, 7), 4), ((130,), None), ((9,), 8), ((20000,), 12345)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_simulator(shape, plant, dtype, generator):
    """(20000,): several blocks and a grid-stride loop."""
    check(op.forward, shape, dtype, generator, plant=plant)


@pytest.mark.sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_edge_cases_in_simulator(dtype):
    assert op.forward(torch.empty(0, dtype=dtype)).item() == 0.0
    assert math.isnan(op.forward(torch.tensor([1.0, float("nan"), -3.0, 2.0], dtype=dtype)).item())
    assert op.forward(torch.tensor([-float("inf"), 2.0, 0.0, 1.0], dtype=dtype)).item() == math.inf
    assert op.forward(torch.tensor([-0.0, 0.0], dtype=dtype)).item() == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (151936, 1024), (4096, 12288 * 2), (4099, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(shape, dtype, generator):
    check(abs_max, shape, dtype, generator, device="cuda", plant=shape[0] * 31 + 7)
