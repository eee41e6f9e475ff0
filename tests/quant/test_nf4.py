import pytest
import torch

from surogate.quant import dynamic8, nf4

# Half the widest gap of the NF4 table (between 0.7229568 and 1.0): the largest rounding error relative to absmax.
HALF_GAP = float(max(nf4.NF4_TABLE[1:] - nf4.NF4_TABLE[:-1])) / 2
# Half the widest gap of the signed dynamic map (0.9789..0.9930): the double-quantised absmax error, relative to
# the group's max |absmax - mean|.
DYN_HALF_GAP = float((dynamic8.dynamic_map(True)[1:] - dynamic8.dynamic_map(True)[:-1]).max()) / 2


def normal_quantile_table() -> torch.Tensor:
    """QLoRA's NF4 construction in float64: 8 positive and 7 negative quantiles of N(0, 1) (offset 0.9677083), zero,
    normalised to [-1, 1] (bitsandbytes create_normal_map; torch's ndtri instead of scipy's norm.ppf)."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return values / values.abs().max()


def test_table_is_the_normal_quantile_construction():
    table = torch.from_numpy(nf4.NF4_TABLE).double()
    assert table.shape == (16,) and table[7] == 0 and table[0] == -1 and table[15] == 1
    assert (table - normal_quantile_table()).abs().max() < 1e-6


def test_table_and_maps_identical_to_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(torch.from_numpy(nf4.NF4_TABLE), functional.get_4bit_type("nf4", device="cpu"))
    for signed in (True, False):
        assert torch.equal(dynamic8.dynamic_map(signed), functional.create_dynamic_map(signed))


def test_dynamic_map_structure():
    s = dynamic8.dynamic_map(True)
    u = dynamic8.dynamic_map(False)
    assert s.shape == u.shape == (256,)
    assert (s[1:] > s[:-1]).all() and (u[1:] > u[:-1]).all()
    assert s[127] == 0 and s[255] == 1 and u[0] == 0 and u[255] == 1
    assert torch.equal(s[:127], -s[128:255].flip(0))


@pytest.mark.parametrize("shape,block_size", [((64, 128), 64), ((7, 37), 64), ((3, 1001), 32), ((513,), 128)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_round_trip_bound(shape, block_size, double_quant, dtype, generator):
    w = (torch.randn(*shape, generator=generator) * 0.02).to(dtype)
    packed = nf4.reference_quantize(w, block_size, double_quant)
    assert packed.codes.dtype == torch.uint8 and packed.codes.numel() == (w.numel() + 1) // 2
    back = nf4.reference_dequantize(packed, torch.float32).double()
    assert back.shape == w.shape
    x = w.double().reshape(-1)
    n_blocks = -(-x.numel() // block_size)
    padded = torch.zeros(n_blocks * block_size, dtype=torch.float64)
    padded[: x.numel()] = x
    true_absmax = padded.view(n_blocks, block_size).abs().amax(1)
    absmax = packed.block_absmax().double()
    absmax_err = (absmax - true_absmax).abs()
    if double_quant:
        dev = (true_absmax - true_absmax.mean()).abs()
        group_max = torch.stack([g.max() for g in dev.split(256)]).repeat_interleave(256)[:n_blocks]
        assert (absmax_err <= DYN_HALF_GAP * group_max * (1 + 1e-5) + 1e-9).all()
    else:
        assert torch.equal(absmax, true_absmax)
    per_elem = (HALF_GAP * true_absmax + absmax_err).repeat_interleave(block_size)[: x.numel()]
    err = (back.reshape(-1) - x).abs()
    # fp32 scaling (x * fp32(1/absmax)) and the output rounding add a few ulps: 1e-6 relative slack, plus the
    # output dtype's half ulp for bf16
    slack = 1e-6 * per_elem + (x.abs() * 2.0**-8 if dtype == torch.bfloat16 else 0)
    assert (err <= per_elem + slack).all()


def test_round_trip_error_on_gaussian_weights(generator):
    """Relative Frobenius error of NF4 (+ double quant) on N(0, 0.02^2) weights: 0.092 measured; bound 0.1."""
    w = torch.randn(256, 1024, generator=generator) * 0.02
    back = nf4.dequantize(nf4.quantize(w), torch.float32)
    rel = ((back.double() - w.double()).norm() / w.double().norm()).item()
    assert 0.08 < rel < 0.1


def test_footprint_and_errors():
    w = torch.randn(4096, 256)
    packed = nf4.quantize(w)
    n = w.numel()
    assert packed.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4  # 4.127 bits a value
    assert not nf4.quantize(w, double_quant=False).double_quant
    with pytest.raises(ValueError, match="block_size"):
        nf4.quantize(w, block_size=63)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        nf4.quantize(w.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_identical_to_bitsandbytes(dtype, generator):
    functional = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(300, 129, generator=generator) * 0.02).to(dtype)
    packed = nf4.quantize(w)
    q, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.codes, q.reshape(-1))  # the 4-bit codes and their nibble order
    assert packed.absmax_offset.item() == state.offset.item()
    assert torch.equal(packed.absmax_scale, state.state2.absmax)
    # bitsandbytes' CPU C++ double quantisation divides (x / absmax) and compares distances, a hair different from
    # its reference rule (x * (1 / absmax), midpoints) that we follow: rare one-code differences
    diff = (packed.absmax_codes.int() - state.absmax.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02
    # our packed bytes decode identically through bitsandbytes
    state.absmax = packed.absmax_codes.clone()
    assert torch.equal(functional.dequantize_4bit(q, state), nf4.dequantize(packed))


# ---------------------------------------------------------------------------------------------------- kernels
def check_kernels(shape, dtype, double_quant, generator, device):
    w = (torch.randn(*shape, generator=generator) * 0.02).to(dtype)
    ref = nf4.reference_quantize(w, 64, double_quant)
    got = nf4.quantize_kernel(w.to(device), 64, double_quant).to("cpu")
    assert torch.equal(got.codes, ref.codes)
    if double_quant:
        # the double quantisation runs as torch ops on the device: the fp32 mean of the absmax values may sum in
        # another order on a GPU (one ulp), so the decoded absmax agree to fp32 rounding, not bit for bit
        assert torch.allclose(got.block_absmax(), ref.block_absmax(), rtol=1e-6, atol=0)
    else:
        assert torch.equal(got.absmax, ref.absmax)
    for out_dtype in (torch.float32, torch.bfloat16):
        back = nf4.dequantize_kernel(ref.to(device), out_dtype).cpu()
        assert back.dtype == out_dtype and torch.equal(back, nf4.reference_dequantize(ref, out_dtype))


@pytest.mark.sim
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_in_simulator(dtype, double_quant, generator):
    check_kernels((5, 61), dtype, double_quant, generator, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_gpu(dtype, double_quant, generator):
    check_kernels((4096, 4096), dtype, double_quant, generator, "cuda")
    check_kernels((1001, 37), dtype, double_quant, generator, "cuda")


@pytest.mark.gpu
def test_gpu_dequantize_matches_bitsandbytes_cuda(generator):
    functional = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(4096, 4096, generator=generator) * 0.02).bfloat16().cuda()
    packed = nf4.quantize(w)
    q, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.codes, q.reshape(-1))
    state.absmax = packed.absmax_codes.clone()
    state.state2.absmax = packed.absmax_scale.clone()
    state.offset = packed.absmax_offset.reshape(()).clone()
    assert torch.equal(functional.dequantize_4bit(q, state), nf4.dequantize(packed))
