import math

import pytest
import torch

from surogate.quant import fp8

FORMATS = ["e4m3", "e5m2"]
ALL_CODES = torch.arange(256, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------- float64 oracles
def value_float64(code: int, fmt: str) -> float:
    """The OCP FP8 value of a code, from the bit fields in float64 (independent of torch's casts)."""
    f = fp8.FORMATS[fmt]
    ebits = 7 - f.mbits
    bias = 1 - f.emin
    sign = -1.0 if code & 0x80 else 1.0
    e = (code >> f.mbits) & ((1 << ebits) - 1)
    m = code & ((1 << f.mbits) - 1)
    if fmt == "e4m3" and (code & 0x7F) == 0x7F:
        return math.nan
    if fmt == "e5m2" and e == 31:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * m * 2.0 ** (f.emin - f.mbits)
    return sign * (1 + m / 2**f.mbits) * 2.0 ** (e - bias)


def encode_float64(x: torch.Tensor, scale: float, fmt: str) -> torch.Tensor:
    """Nearest finite FP8 value of fp32(x * scale) by search in float64, ties to the even code, saturating;
    NaN -> 0x7F | sign."""
    f = fp8.FORMATS[fmt]
    mags = torch.tensor([value_float64(c, fmt) for c in range(128)], dtype=torch.float64)
    n_finite = 0x7F if fmt == "e4m3" else 0x7C
    mags = mags[:n_finite]
    y = (x.float() * torch.tensor(scale, dtype=torch.float32)).double()
    a = y.abs().clamp(max=f.max)
    hi = torch.searchsorted(mags, a).clamp(max=n_finite - 1)  # first magnitude >= a
    lo = (hi - 1).clamp(min=0)
    d_lo = a - mags[lo]
    d_hi = mags[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo)
    code = code | (torch.signbit(x).long() << 7)
    code = torch.where(torch.isnan(x), 0x7F | (torch.signbit(x).long() << 7), code)
    return code.to(torch.uint8)


def special_inputs(fmt: str, n: int, generator) -> torch.Tensor:
    """Random floats over the whole FP8 range plus saturation, subnormals, exact ties, zeros, inf and NaN."""
    f = fp8.FORMATS[fmt]
    logs = torch.rand(n, generator=generator) * (math.log2(f.max) - f.emin + f.mbits + 4) + f.emin - f.mbits - 3
    x = torch.exp2(logs) * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    mids = fp8.reference_decode(ALL_CODES, 1.0, fmt, torch.float64)  # ties: midpoints between neighbours
    mids = mids[torch.isfinite(mids)]
    ties = (mids[:-1] + mids[1:]) / 2
    nan = float("nan")
    specials = torch.tensor(
        [0.0, -0.0, nan, -nan, math.inf, -math.inf, 1e30, -1e30, f.max, f.max * 1.03, f.max * 1.2, 1e-30, -1e-45]
    )
    return torch.cat([x, ties.float(), specials, torch.randn(n, generator=generator)])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: identical bits, or both NaN."""
    a32 = a.float()
    b32 = b.float()
    return (a32.view(torch.int32) == b32.view(torch.int32)) | (a32.isnan() & b32.isnan())


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_decode_matches_bit_fields(fmt):
    expected = torch.tensor([value_float64(c, fmt) for c in range(256)], dtype=torch.float64)
    got = fp8.reference_decode(ALL_CODES, 1.0, fmt, torch.float32)
    assert same_bits(got, expected).all()
    scaled = fp8.reference_decode(ALL_CODES, 3.0, fmt, torch.float32)
    assert same_bits(scaled, (expected.float() / 3.0)).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.37, 24.0])
def test_reference_encode_is_nearest_saturated(fmt, dtype, scale, generator):
    x = special_inputs(fmt, 4000, generator).to(dtype)
    got = fp8.reference_encode(x, scale, fmt)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    expected = encode_float64(x, scale, fmt)
    bad = (got != expected).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} mismatches, first x={x[bad[:4]].tolist()} got {got[bad[:4]].tolist()}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_finite_code_round_trips(fmt):
    values = fp8.reference_decode(ALL_CODES, 1.0, fmt, torch.float32)
    finite = torch.isfinite(values)
    codes = fp8.reference_encode(values[finite], 1.0, fmt)
    assert torch.equal(codes, ALL_CODES[finite])


def test_amax_and_scales(generator):
    x = torch.randn(1000, generator=generator)
    x[3] = float("nan")
    amax = torch.tensor([0.5])
    fp8.reference_encode(x, 2.0, "e4m3", amax_out=amax)
    assert amax.item() == x[~x.isnan()].abs().max().item()
    assert fp8.scale_from_amax(torch.tensor(2.0), "e4m3").item() == 224.0
    assert fp8.scale_from_amax(torch.tensor(2.0), "e5m2", margin=1).item() == 57344.0 / 4
    assert fp8.scale_from_amax(torch.tensor(0.0), "e4m3", previous=torch.tensor(7.0)).item() == 7.0
    assert fp8.scale_from_amax(torch.tensor(1e-45), "e4m3").item() == torch.finfo(torch.float32).max


@pytest.mark.parametrize("fmt", FORMATS)
def test_just_in_time_quantize_error_bound(fmt, generator):
    """Per-tensor scaling puts max|x| at the format max; every value in the normal range is then within half an
    ulp: relative error <= 2^-(mbits+1)."""
    f = fp8.FORMATS[fmt]
    x = torch.randn(64, 100, generator=generator, dtype=torch.float64).float() * 3
    codes, scale = fp8.quantize(x, fmt)
    back = fp8.decode(codes, scale, fmt, torch.float32).double()
    normal = x.double().abs() * scale.item() >= 2.0**f.emin
    rel = ((back - x.double()).abs() / x.double().abs())[normal]
    assert rel.max().item() <= 2.0 ** -(f.mbits + 1) * (1 + 1e-6)
    assert normal.float().mean() > 0.99


def test_delayed_scaling_window_margin_and_roll():
    ds = fp8.DelayedScaling(3, "e4m3", history_len=4, margin=1)
    ds.amax_slot(0).fill_(2.0)
    ds.amax_slot(1).fill_(float("inf"))  # invalid: keeps the old scale
    ds.update()
    assert ds.scale.tolist() == [448.0 / 4, 1.0, 1.0]
    assert torch.equal(ds.scale_inv, 1 / ds.scale)
    assert ds.amax_history[0].tolist() == [0.0, 0.0, 0.0] and ds.amax_history[1, 0].item() == 2.0
    ds.amax_slot(0).fill_(1.0)  # the window still holds 2.0
    ds.update()
    assert ds.scale[0].item() == 448.0 / 4
    for _ in range(3):  # 2.0 leaves the 4-row window after 4 rolls
        ds.update()
    assert ds.scale[0].item() == 448.0 / 2
    ds.update()
    assert ds.scale[0].item() == 448.0 / 2  # all-zero window: keep


def test_reference_encode_both_and_out_buffers(generator):
    x = torch.randn(37, 45, generator=generator) * 30
    codes, codes_t = fp8.encode_both(x, 0.5, "e5m2")
    assert torch.equal(codes, fp8.encode(x, 0.5, "e5m2")) and torch.equal(codes_t, codes.t())
    out = torch.zeros(45, 37, dtype=torch.uint8)
    assert fp8.encode_transpose(x, 0.5, "e5m2", out=out) is out and torch.equal(out, codes_t)
    with pytest.raises(ValueError, match="shape"):
        fp8.encode(x, 0.5, "e5m2", out=torch.empty(3, dtype=torch.uint8))


def test_delayed_scaling_defaults_and_errors():
    assert fp8.DelayedScaling(2).amax_history.shape == (1024, 2)
    with pytest.raises(ValueError, match="e4m3"):
        fp8.encode(torch.ones(3), 1.0, "e3m4")
    with pytest.raises(ValueError, match="finite"):
        fp8.encode(torch.ones(3), 0.0)


# ---------------------------------------------------------------------------------- kernels (simulator, GPU)
def check_kernels(fmt, dtype, generator, device, n=4000, shape=(37, 45)):
    """The Numba kernels (called directly: in the simulator tensors stay on the CPU) against torch's casts."""
    x = special_inputs(fmt, n, generator).to(dtype)
    scale = torch.tensor([0.37])
    f = fp8.FORMATS[fmt]
    # encode: bit for bit equal to torch's cast after clamping (torch's e5m2 cast does not saturate)
    expected = (x.float() * scale).clamp(-f.max, f.max).to(f.torch_dtype).view(torch.uint8)
    nan_code = torch.where(torch.signbit(x), 0xFF, 0x7F).to(torch.uint8)
    expected = torch.where(x.isnan(), nan_code, expected)
    amax = torch.zeros(1, device=device)
    got = fp8.encode_kernel(x.to(device), scale.to(device), fmt, amax_out=amax)
    assert torch.equal(got.cpu(), expected), f"{(got.cpu() != expected).sum()} codes differ"
    assert amax.item() == x.float()[~x.isnan()].abs().max().item()
    # decode: all 256 codes, fp32 bit for bit; bf16 = the fp32 value rounded once
    for out_dtype in (torch.float32, torch.bfloat16):
        got = fp8.decode_kernel(ALL_CODES.to(device), scale.to(device), fmt, out_dtype).cpu()
        ref = (ALL_CODES.view(f.torch_dtype).float() / scale).to(out_dtype)
        assert got.dtype == out_dtype and same_bits(got, ref).all()
    # quantise + transpose (odd shape: partial tiles)
    x2 = (torch.randn(*shape, generator=generator) * 50).to(dtype)
    amax = torch.zeros(1, device=device)
    got_t = fp8.encode_transpose_kernel(x2.to(device), scale.to(device), fmt, amax_out=amax)
    assert got_t.shape == (shape[1], shape[0])
    assert torch.equal(got_t.cpu(), fp8.reference_encode(x2, scale, fmt).t())
    assert amax.item() == x2.float().abs().max().item()
    # both layouts from one pass, written into given buffers (a cached weight re-encoded in place)
    amax = torch.zeros(1, device=device)
    out = torch.empty(shape, dtype=torch.uint8, device=device)
    out_t = torch.empty(shape[::-1], dtype=torch.uint8, device=device)
    codes, codes_t = fp8.encode_both_kernel(x2.to(device), scale.to(device), fmt, amax_out=amax, out=out, out_t=out_t)
    assert codes is out and codes_t is out_t
    assert torch.equal(out.cpu(), fp8.reference_encode(x2, scale, fmt)) and torch.equal(out_t.cpu(), got_t.cpu())
    assert amax.item() == x2.float().abs().max().item()


def check_vectorised_bf16(fmt, generator, device, n, shape=(68, 132)):
    """BF16 inputs with a size divisible by 4 take the 4-at-a-time kernels (8-byte loads): the same codes and amax,
    also from an offset view (8-byte aligned) and into a given buffer; a misaligned view takes the scalar kernel.
    The transposing kernels with both dims divisible by 4 (64x64 tiles, partial at the edges) likewise."""
    x2 = (torch.randn(*shape, generator=generator) * 50).bfloat16()
    x2[3, 5], x2[shape[0] - 1, shape[1] - 2] = 1e6, -float("inf")  # saturation
    want = fp8.reference_encode(x2, 0.37, fmt)
    amax = torch.zeros(1, device=device)
    codes, codes_t = fp8.encode_both_kernel(x2.to(device), torch.tensor([0.37], device=device), fmt, amax)
    assert torch.equal(codes.cpu(), want) and torch.equal(codes_t.cpu(), want.t())
    assert amax.item() == float("inf")
    got_t = fp8.encode_transpose_kernel(x2[:, 4:].to(device), torch.tensor([0.37], device=device), fmt)
    assert torch.equal(got_t.cpu(), want[:, 4:].t())  # a strided input: made contiguous first
    x = special_inputs(fmt, n, generator)
    x = torch.cat([x, torch.randn(-x.numel() % 4 + 8, generator=generator)]).bfloat16()
    scale = torch.tensor([0.37])
    for view in (x, x[4:], x[1:-3]):  # aligned, aligned at an offset, misaligned (scalar fallback)
        expected = fp8.reference_encode(view, scale, fmt)
        amax = torch.zeros(1, device=device)
        out = torch.empty(view.shape, dtype=torch.uint8, device=device)
        got = fp8.encode_kernel(view.to(device) if device != "cpu" else view, scale.to(device), fmt, amax, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got.cpu(), expected), f"{(got.cpu() != expected).sum()} codes differ"
        assert amax.item() == view.float()[~view.isnan()].abs().max().item()


@pytest.mark.sim
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_in_simulator(fmt, dtype, generator):
    check_kernels(fmt, dtype, generator, "cpu", n=150, shape=(40, 33))


@pytest.mark.sim
@pytest.mark.parametrize("fmt", FORMATS)
def test_vectorised_bf16_encode_in_simulator(fmt, generator):
    check_vectorised_bf16(fmt, generator, "cpu", n=100)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_gpu(fmt, dtype, generator):
    check_kernels(fmt, dtype, generator, "cuda", n=1 << 22, shape=(4096, 4099))
    if dtype == torch.bfloat16:
        check_vectorised_bf16(fmt, generator, "cuda", n=1 << 22, shape=(2052, 4100))


@pytest.mark.gpu
def test_delayed_scaling_on_gpu_with_fused_amax(generator):
    ds = fp8.DelayedScaling(2, "e4m3", device="cuda")
    x = torch.randn(4096, 4096, generator=generator).cuda().bfloat16()
    codes = fp8.encode(x, ds.scale_slot(0), "e4m3", amax_out=ds.amax_slot(0))  # dispatches to the kernel
    assert torch.equal(codes.cpu(), fp8.reference_encode(x.cpu(), 1.0, "e4m3"))
    ds.update()
    assert ds.scale[0].item() == pytest.approx(448.0 / x.float().abs().max().item(), rel=1e-6)
