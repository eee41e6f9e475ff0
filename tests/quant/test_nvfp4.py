import pytest
import torch

from surogate.quant import fp8, nvfp4

GRID = torch.tensor(nvfp4.E2M1_GRID, dtype=torch.float64)


def unpack(t: nvfp4.NVFP4Tensor) -> torch.Tensor:
    """Codes [R, C] from the packed bytes: element 2i in the low nibble."""
    c = t.codes.long()
    return torch.stack([c & 15, c >> 4], dim=2).reshape(c.shape[0], -1)


def code_values(codes: torch.Tensor) -> torch.Tensor:
    return GRID[codes & 7] * torch.where(codes >= 8, -1.0, 1.0).double()


def half_gap(a: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 grid spacing around |v| = a (0.5 below 2, 1 below 4, 2 up to 6)."""
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0)).double()


def scaled_inputs(t: nvfp4.NVFP4Tensor, x: torch.Tensor) -> torch.Tensor:
    """x * S / block_scale in float64: the values the E2M1 rounding sees (0 where the block scale is 0)."""
    scale = fp8.reference_decode(t.block_scales, 1.0, "e4m3", torch.float64).repeat_interleave(16, 1)
    if t.block_2d:
        scale = scale.repeat_interleave(16, 0)[: x.shape[0]]
    s = t.global_scale.double()
    return torch.where(scale > 0, x.double() * s / scale, torch.zeros_like(scale))


def test_e2m1_rounding_matches_float64_nearest_even():
    v = torch.cat([torch.arange(-7 * 64, 7 * 64 + 1) / 64.0, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])
    v = torch.cat([v, -v[-7:]]).float()
    got = nvfp4._e2m1_reference(v, False, torch.arange(v.numel()), 0)
    a = v.double().abs().clamp(max=6)
    dist = (a[:, None] - GRID[None, :]).abs()  # distances are multiples of 1/64: a tie-break of 1e-9 is safe
    expected = (dist + 1e-9 * (torch.arange(8) % 2)).argmin(1)  # nearest; ties to the even code
    expected |= torch.signbit(v).long() << 3
    assert torch.equal(got, expected)


@pytest.mark.parametrize("block_2d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_round_trip_bounds(block_2d, dtype, generator):
    x = (torch.randn(40, 96, generator=generator) * torch.rand(40, 1, generator=generator) * 5).to(dtype)
    x[3, :16] = 0  # an all-zero block
    t = nvfp4.reference_quantize(x, block_2d=block_2d)
    assert t.codes.shape == (40, 48) and t.codes.dtype == torch.uint8
    assert t.block_scales.shape == ((3, 6) if block_2d else (40, 6))
    amax = x.double().abs().max()
    assert t.global_scale.item() == pytest.approx(448 * 6 / amax.item(), rel=1e-6)
    # block scales: E4M3 of block_amax / 6 * S, within half an E4M3 ulp (2^-4 relative) in the normal range
    a = x.double().abs()
    block_amax = (
        torch.nn.functional.pad(a, (0, 0, 0, 8)).view(3, 16, 6, 16).amax((1, 3))
        if block_2d
        else a.view(40, 6, 16).amax(2)
    )
    wanted = block_amax / 6 * t.global_scale.double()
    got = fp8.reference_decode(t.block_scales, 1.0, "e4m3", torch.float64)
    normal = wanted >= 2.0**-6
    assert ((got - wanted).abs() <= wanted * 2.0**-4 * (1 + 1e-6))[normal].all()
    # each value within half an E2M1 gap of x * S / block_scale (after saturation at 6)
    v = scaled_inputs(t, x)
    q = code_values(unpack(t))
    vc = v.clamp(-6, 6)
    assert ((q - vc).abs() <= half_gap(vc.abs()) * (1 + 1e-6) + 1e-6).all()
    # and dequantise = value * block_scale / S (one fp32 rounding)
    scale = fp8.reference_decode(t.block_scales, 1.0, "e4m3", torch.float64).repeat_interleave(16, 1)
    if block_2d:
        scale = scale.repeat_interleave(16, 0)[:40]
    expected = q * scale / t.global_scale.double()
    back = nvfp4.reference_dequantize(t, torch.float32).double()
    assert ((back - expected).abs() <= expected.abs() * 2.0**-24).all()


def test_round_trip_error_on_gaussian(generator):
    """Relative Frobenius error on N(0, 1): 1-D blocks ~0.094, 16x16 tiles ~0.10 (measured); bounds 0.11 / 0.12."""
    x = torch.randn(256, 512, generator=generator)
    for block_2d, bound in ((False, 0.11), (True, 0.12)):
        back = nvfp4.dequantize(nvfp4.quantize(x, block_2d=block_2d), torch.float32)
        rel = ((back.double() - x.double()).norm() / x.double().norm()).item()
        assert 0.05 < rel < bound, (block_2d, rel)


def test_2d_tiles_quantise_w_and_w_transposed_identically(generator):
    w = torch.randn(64, 48, generator=generator) * 0.02
    a = nvfp4.dequantize(nvfp4.quantize(w, block_2d=True), torch.float32)
    b = nvfp4.dequantize(nvfp4.quantize(w.t().contiguous(), block_2d=True), torch.float32)
    assert torch.equal(a.t(), b)


def test_nibble_order_and_global_scale():
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 6.0, -0.5  # global amax 6: S = 448, block scale 448 (E4M3 max) -> v = x
    t = nvfp4.quantize(x)
    assert t.global_scale.item() == 448.0 and t.block_scales[0, 0].item() == 0x7E
    assert t.codes[0, 0].item() == 0x7 | (0x9 << 4)  # element 0 (+6 = code 7) low, element 1 (-0.5 = 9) high
    assert nvfp4.global_scale(torch.tensor(0.0)).item() == 1.0
    assert nvfp4.global_scale(torch.tensor(float("nan"))).item() == 1.0
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(torch.ones(4, 20))


def test_stochastic_rounding_is_unbiased_and_deterministic(generator):
    """Over K seeds the mean of the dequantised values converges to x: each element within 6 standard deviations
    of its Bernoulli rounding (sigma = gap * sqrt(p (1 - p) / K)), except values beyond 6 (saturated)."""
    x = torch.randn(8, 64, generator=generator)
    k = 256
    t0 = nvfp4.quantize(x, stochastic=True, seed=1)
    assert torch.equal(t0.codes, nvfp4.quantize(x, stochastic=True, seed=1).codes)
    assert not torch.equal(t0.codes, nvfp4.quantize(x, stochastic=True, seed=2).codes)
    total = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(k):
        total += nvfp4.dequantize(nvfp4.quantize(x, stochastic=True, seed=seed), torch.float32).double()
    mean = total / k
    v = scaled_inputs(t0, x).abs()  # block scales do not depend on the seed
    unit = x.double().abs() / v.where(v > 0, 1)  # x units per unit of v
    a = v.clamp(max=6)
    lo = GRID[torch.bucketize(a, GRID, right=True) - 1]
    gap = 2 * half_gap(a)
    p = ((a - lo) / gap).clamp(0, 1)
    sigma = gap * unit * torch.sqrt(p * (1 - p) / k)
    err = (mean - x.double()).abs()
    inside = v <= 6  # a block's max can exceed 6 when its E4M3 scale rounded down: it saturates (deterministic)
    assert (err <= 6 * sigma + 1e-6 * x.double().abs())[inside].all()
    assert (err <= (v - 6) * unit + 1e-6 * x.double().abs())[~inside].all() and (v <= 6 * (1 + 2.0**-4)).all()
    # and the plain error of one SR draw stays within one grid gap
    one = nvfp4.dequantize(t0, torch.float32).double()
    assert ((one - x.double()).abs() <= gap * unit * (1 + 1e-5) + 1e-12).all()


def test_hadamard_is_orthonormal_and_undoes(generator):
    h = nvfp4.hadamard_matrix() / 4
    assert torch.allclose(h @ h.t(), torch.eye(16, dtype=torch.float64), atol=1e-15)
    signs = nvfp4.hadamard_signs(7)
    assert set(signs.tolist()) == {-1.0, 1.0} and torch.equal(signs, nvfp4.hadamard_signs(7))
    assert not torch.equal(signs, nvfp4.hadamard_signs(8))
    a = torch.randn(64, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    ha, hb = nvfp4.hadamard16(a, seed=7), nvfp4.hadamard16(b, seed=7)
    assert torch.allclose(ha.t() @ hb, a.t() @ b, rtol=0, atol=1e-12)  # the wgrad GEMM is unchanged
    assert torch.allclose(nvfp4.hadamard16(ha, seed=7, inverse=True), a, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.hadamard16(torch.ones(20, 4))


# ---------------------------------------------------------------------------------------------------- kernels
def check_kernels(shape, dtype, generator, device):
    rows, cols = shape
    x = (torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator) * 3).to(dtype)
    x[0, :16] = 0
    for block_2d in (False, True):
        for stochastic in (False, True):
            ref = nvfp4.reference_quantize(x, block_2d=block_2d, stochastic=stochastic, seed=11)
            got = nvfp4.quantize_kernel(x.to(device), block_2d=block_2d, stochastic=stochastic, seed=11).to("cpu")
            assert torch.equal(got.global_scale, ref.global_scale)
            assert torch.equal(got.block_scales, ref.block_scales)
            assert torch.equal(got.codes, ref.codes), (block_2d, stochastic)
            for out_dtype in (torch.float32, torch.bfloat16):
                for include_global in (True, False):
                    back = nvfp4.dequantize_kernel(ref.to(device), out_dtype, include_global).cpu()
                    assert torch.equal(back, nvfp4.reference_dequantize(ref, out_dtype, include_global))
    h = nvfp4.hadamard_kernel(x[: rows - rows % 16].to(device), seed=3).cpu()
    expected = nvfp4.reference_hadamard(x[: rows - rows % 16].double(), seed=3)
    # fp32 butterflies vs a float64 matmul: a few fp32 ulps; bf16 outputs add one bf16 rounding
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert ((h.double() - expected).norm() / expected.norm()).item() < tol


@pytest.mark.sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_in_simulator(dtype, generator):
    check_kernels((18, 32), dtype, generator, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_gpu(dtype, generator):
    check_kernels((4096, 4096), dtype, generator, "cuda")
    check_kernels((1000, 48), dtype, generator, "cuda")
