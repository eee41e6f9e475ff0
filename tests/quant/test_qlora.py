import pytest
import torch

from surogate.quant import fp8_block
from surogate.quant.qlora import QuantizedWeight, memory_report


def tile_expand(per_tile, shape, tile):
    return per_tile.repeat_interleave(tile, 0)[: shape[0]].repeat_interleave(tile, 1)[:, : shape[1]]


@pytest.mark.parametrize("shape,tile", [((256, 384), 128), ((200, 130), 128), ((40, 70), 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_reference_bound(shape, tile, dtype, generator):
    """Within half an E4M3 ulp: 2^-4 relative in the normal range, 2^-10 * scale_inv (half the subnormal step)
    below it."""
    w = (torch.randn(*shape, generator=generator) * 0.02).to(dtype)
    w[:tile, :tile] = 0  # an all-zero tile
    t = fp8_block.reference_quantize(w, tile)
    assert t.codes.shape == shape and t.scale_inv.shape == (-(-shape[0] // tile), -(-shape[1] // tile))
    x = w.double()
    inv = tile_expand(t.scale_inv.double(), shape, tile)
    back = fp8_block.reference_dequantize(t, torch.float32).double()
    bound = torch.maximum(x.abs() * 2.0**-4, inv * 2.0**-10) * (1 + 1e-5)
    assert ((back - x).abs() <= bound).all()
    assert (back[:tile, :tile] == 0).all()
    amax = torch.nn.functional.pad(x.abs(), (0, -shape[1] % tile, 0, -shape[0] % tile))
    amax = amax.view(t.scale_inv.shape[0], tile, t.scale_inv.shape[1], tile).amax((1, 3))
    assert torch.allclose(t.scale_inv.double(), amax / 448, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt,bits,rel_bound", [("fp8", 8.002, 0.03), ("nvfp4", 4.5, 0.12), ("nf4", 4.127, 0.1)])
def test_quantized_weight_formats(fmt, bits, rel_bound, generator):
    """Relative Frobenius error on N(0, 0.02^2) weights: measured fp8 0.025, nvfp4 0.094, nf4 0.092."""
    w = torch.randn(512, 1024, generator=generator) * 0.02
    q = QuantizedWeight.quantize(w, fmt)
    assert q.shape == w.shape and q.fmt == fmt
    back = q.dequantize()
    assert back.dtype == torch.bfloat16 and back.shape == w.shape
    rel = ((back.double() - w.double()).norm() / w.double().norm()).item()
    assert rel < rel_bound, rel
    assert abs(8 * q.nbytes / w.numel() - bits) < 0.01
    assert torch.equal(q.dequantize(torch.float32).bfloat16(), back)


def test_memory_report_and_errors(generator):
    weights = {
        "layers.0.q_proj": QuantizedWeight.quantize(torch.randn(1024, 1024, generator=generator), "nf4"),
        "embed_tokens": torch.zeros(1000, 1024, dtype=torch.bfloat16),
    }
    text = memory_report(weights)
    assert "nf4" in text and "25.8%" in text and "4.127 bits" in text and "1.95 MiB" in text
    with pytest.raises(ValueError, match="fp8"):
        QuantizedWeight.quantize(torch.ones(4, 4), "int4")
    with pytest.raises(ValueError, match="2-D"):
        QuantizedWeight.quantize(torch.ones(4), "nf4")


# ---------------------------------------------------------------------------------------------------- kernels
def check_fp8_block_kernels(shape, tile, dtype, generator, device):
    w = (torch.randn(*shape, generator=generator) * 0.05).to(dtype)
    w[:tile, :tile] = 0
    ref = fp8_block.reference_quantize(w, tile)
    got = fp8_block.quantize_kernel(w.to(device), tile).to("cpu")
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale_inv, ref.scale_inv)
    for out_dtype in (torch.float32, torch.bfloat16):
        back = fp8_block.dequantize_kernel(ref.to(device), out_dtype).cpu()
        assert torch.equal(back, fp8_block.reference_dequantize(ref, out_dtype))


@pytest.mark.sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_kernels_in_simulator(dtype, generator):
    check_fp8_block_kernels((20, 40), 16, dtype, generator, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_kernels_on_gpu(dtype, generator):
    check_fp8_block_kernels((4096, 4096), 128, dtype, generator, "cuda")
    check_fp8_block_kernels((1000, 300), 128, dtype, generator, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "nf4"])
def test_quantized_weight_on_gpu_matches_cpu(fmt, generator):
    w = (torch.randn(4096, 4096, generator=generator) * 0.02).bfloat16()
    gpu = QuantizedWeight.quantize(w.cuda(), fmt)
    cpu = QuantizedWeight.quantize(w, fmt)
    assert torch.equal(gpu.data.codes.cpu(), cpu.data.codes)
    if fmt == "nf4":  # the absmax mean (double quantisation) may round differently on the GPU: one bf16 ulp at most
        diff = (gpu.dequantize().cpu().float() - cpu.dequantize().float()).abs()
        assert (diff <= cpu.dequantize().float().abs() * 2.0**-8).all()
    else:
        assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())
