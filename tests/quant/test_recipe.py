import copy

import pytest
import torch

from surogate.kernels.testing import assert_close, rel_err
from surogate.quant import fp8, nvfp4
from surogate.quant.qlora import QuantizedWeight
from surogate.quant.recipe import Recipe


def inputs(generator, m=(4, 32), k=64, n=48, dtype=torch.float32, device="cpu"):
    x = torch.randn(*m, k, generator=generator).to(dtype).to(device)
    w = (torch.randn(n, k, generator=generator) * 0.1).to(dtype).to(device)
    dy = torch.randn(*m, n, generator=generator).to(dtype).to(device)
    return x, w, dy


def float64_truth(x, w, dy):
    x2, dy2 = x.double().reshape(-1, x.shape[-1]).cpu(), dy.double().reshape(-1, dy.shape[-1]).cpu()
    w = w.double().cpu()
    return (x2 @ w.t()).view(*x.shape[:-1], -1), (dy2 @ w).view(*x.shape), dy2.t() @ x2


def run(recipe, ctx, x, w, dy):
    y = recipe.forward(x, w, ctx)
    dx, dw = recipe.backward(dy, x, w, ctx)
    return y, dx, dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_recipe_is_plain_matmul(dtype, generator):
    x, w, dy = inputs(generator, dtype=dtype)
    recipe = Recipe("bf16")
    y, dx, dw = run(recipe, recipe.linear("q_proj", 0), x, w, dy)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    for got, want, name in zip((y, dx, dw), float64_truth(x, w, dy), ("y", "dx", "dW"), strict=True):
        assert_close(got, want, dtype, name, factor=2.0)  # bf16 inputs and outputs: two roundings


def test_layer_modes_and_errors():
    recipe = Recipe("fp8-hybrid", n_layers=6, skip_quant_first_layers=1, skip_quant_last_layers=2)
    modes = [recipe.linear("q_proj", i).mode for i in range(6)]
    assert modes == ["bf16", "fp8", "fp8", "fp8", "bf16", "bf16"]
    assert recipe.linear("lm_head").mode == "bf16" and recipe.linear("embed_tokens", None).mode == "bf16"
    assert [c.slot for c in recipe.contexts if c.mode == "fp8"] == [0, 1, 2]
    assert Recipe("bf16", n_layers=4).linear("o_proj", 2).mode == "bf16"
    assert Recipe("nvfp4", n_layers=4).linear("o_proj", 2).mode == "nvfp4"
    with pytest.raises(ValueError, match="bf16, fp8-hybrid, nvfp4"):
        Recipe("fp8")


def test_fp8_forward_is_quantise_dequantise_matmul(generator):
    """Forward = Q(x) Q(W)^T with Q the E4M3 round trip (x at the delayed scale, just in time before the first
    optimizer step, as W always), up to fp32 accumulation; and within FP8's error of x W^T (measured 0.037)."""
    x, w, dy = inputs(generator)
    recipe = Recipe("fp8-hybrid", n_layers=1)
    y = recipe.forward(x, w, recipe.linear("q_proj", 0))
    xq, sx = fp8.quantize(x)
    qx = fp8.decode(xq, sx, "e4m3", torch.float64)
    wq, sw = fp8.quantize(w)
    qw = fp8.decode(wq, sw, "e4m3", torch.float64)
    assert rel_err(y, qx @ qw.t()) < 1e-6
    y64, _, _ = float64_truth(x, w, dy)
    assert 0.01 < rel_err(y, y64) < 0.06


def test_fp8_delayed_scaling_and_backward(generator):
    """E5M2 gradients: dgrad and wgrad within 0.1 of float64 (measured 0.059)."""
    x, w, dy = inputs(generator)
    recipe = Recipe("fp8-hybrid", n_layers=2, amax_history_len=16)
    ctx = recipe.linear("q_proj", 1)
    y, dx, dw = run(recipe, ctx, x, w, dy)
    scaling = recipe._delayed_scaling("cpu")
    assert scaling.amax_history[0, ctx.slot].item() == x.abs().max().item()
    assert scaling.scale[ctx.slot].item() == 1.0
    _, dx64, dw64 = float64_truth(x, w, dy)
    assert rel_err(dx, dx64) < 0.1 and rel_err(dw, dw64) < 0.1
    recipe.after_optimizer_step()
    expected = (torch.tensor(448.0) / x.abs().max()).item()
    assert scaling.scale[ctx.slot].item() == expected and scaling.amax_history[0, ctx.slot].item() == 0
    y2 = recipe.forward(x, w, ctx)  # now at the delayed scale: the one the calibration step used for this x
    assert torch.equal(y, y2)


def test_fp8_first_step_calibrates_instead_of_scale_one(generator):
    """Before the first optimizer step there is no amax history: x and dy are scaled just in time (their amaxes
    still recorded), so tiny gradients are not flushed by E5M2 at scale 1 (least value 2^-16 = 1.5e-5)."""
    x, w, dy = inputs(generator)
    dy = dy * 1e-6  # the size of per-token gradients of a long batch
    recipe = Recipe("fp8-hybrid", n_layers=1)
    ctx = recipe.linear("down_proj", 0)
    assert not recipe.calibrated and Recipe("bf16").calibrated
    _, dx, dw = run(recipe, ctx, x, w, dy)
    assert not recipe.calibrated
    _, dx64, dw64 = float64_truth(x, w, dy)
    assert rel_err(dx, dx64) < 0.1 and rel_err(dw, dw64) < 0.1  # at scale 1 nearly every dy code is 0
    grads = recipe._delayed_scaling("cpu", grad=True)
    assert grads.amax_history[0, ctx.slot].item() == dy.abs().max().item()
    recipe.after_optimizer_step()
    assert recipe.calibrated
    _, dx2, dw2 = run(recipe, ctx, x, w, dy)  # the delayed scale of the same dy: the same results
    assert torch.equal(dx, dx2) and torch.equal(dw, dw2)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_scaled_mm_path_matches_emulation(out_dtype, generator):
    """torch._scaled_mm (here its CPU implementation) with our codes, layouts and inverse scales gives the
    emulated GEMM: same FP8 products, fp32 sums in another order; bf16 outputs add one rounding."""
    x, w, dy = inputs(generator, dtype=out_dtype)
    outs = []
    for gemm in ("emulate", "scaled_mm"):
        recipe = Recipe("fp8-hybrid", n_layers=1, gemm=gemm)
        outs.append(run(recipe, recipe.linear("up_proj", 0), x, w, dy))
    for a, b, name in zip(*outs, ("y", "dx", "dW"), strict=True):
        assert a.dtype == b.dtype == out_dtype
        assert_close(b, a.double(), out_dtype, name, factor=2.0 if out_dtype == torch.bfloat16 else 10.0)


def test_nvfp4_recipe_bounds_and_seeds(generator):
    """NVFP4 on both operands: forward ~0.15, dgrad ~0.18, wgrad ~0.17 relative error (measured); bounds 0.25.
    Stochastic rounding is deterministic within a step and changes after an optimizer step."""
    x, w, dy = inputs(generator, m=(3, 37))  # 111 tokens: the wgrad pads to 112 for the Hadamard groups
    recipe = Recipe("nvfp4", n_layers=1, seed=3)
    ctx = recipe.linear("down_proj", 0)
    y, dx, dw = run(recipe, ctx, x, w, dy)
    y64, dx64, dw64 = float64_truth(x, w, dy)
    assert rel_err(y, y64) < 0.25 and rel_err(dx, dx64) < 0.25 and rel_err(dw, dw64) < 0.25
    xq = nvfp4.dequantize(nvfp4.quantize(x.reshape(-1, 64)), torch.float64)
    wq = nvfp4.dequantize(nvfp4.quantize(w, block_2d=True), torch.float64)
    assert rel_err(y.reshape(-1, 48), xq @ wq.t()) < 1e-6  # forward = exact NVFP4 operands, fp32 GEMM
    _, dx_again, dw_again = run(recipe, ctx, x, w, dy)
    assert torch.equal(dx, dx_again) and torch.equal(dw, dw_again)
    recipe.after_optimizer_step()
    _, dx_next, dw_next = run(recipe, ctx, x, w, dy)
    assert not torch.equal(dx, dx_next) and not torch.equal(dw, dw_next)


def test_nvfp4_1d_weight_blocks(generator):
    """fp4_disable_2d_quantization: the forward multiplies by W in 1-D blocks along K, dgrad by W^T in 1-D blocks
    along N (not the forward's tiles); within NVFP4's error of float64, and other than the 16x16-tile default."""
    x, w, dy = inputs(generator, m=(3, 37), n=64)
    one_d = Recipe("nvfp4", n_layers=1, seed=3, fp4_disable_2d_quantization=True)
    tiles = Recipe("nvfp4", n_layers=1, seed=3)
    assert "1-D blocks for weights" in one_d.describe() and "16x16 tiles" in tiles.describe()
    got = run(one_d, one_d.linear("down_proj", 0), x, w, dy)
    default = run(tiles, tiles.linear("down_proj", 0), x, w, dy)
    xq = nvfp4.dequantize(nvfp4.quantize(x.reshape(-1, 64)), torch.float64)
    wq = nvfp4.dequantize(nvfp4.quantize(w), torch.float64)  # 1-D blocks along K
    assert rel_err(got[0].reshape(-1, 64), xq @ wq.t()) < 1e-6
    wq_t = nvfp4.dequantize(nvfp4.quantize(w.t().contiguous()), torch.float64)  # 1-D blocks along N
    assert not torch.equal(wq_t.t(), wq)  # dgrad's weight is not the forward's
    for a, truth in zip(got, float64_truth(x, w, dy), strict=True):
        assert rel_err(a, truth) < 0.25
    assert not torch.equal(got[0], default[0]) and not torch.equal(got[1], default[1])  # y, dx: W's blocks differ
    assert torch.equal(got[2], default[2])  # wgrad does not read W


@pytest.mark.parametrize("name", ["bf16", "fp8-hybrid", "nvfp4"])
def test_quantized_base_weight_is_dequantised_per_gemm(name, generator):
    x, w, dy = inputs(generator, dtype=torch.bfloat16)
    qw = QuantizedWeight.quantize(w, "nf4")
    recipe = Recipe(name, n_layers=1)
    ctx = recipe.linear("v_proj", 0)
    y, dx, _ = run(recipe, ctx, x, qw, dy)
    y_ref, dx_ref, _ = run(recipe, ctx, x, qw.dequantize(), dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_autograd_wrapper(generator):
    x, w, dy = inputs(generator)
    recipe = Recipe("bf16")
    ctx = recipe.linear("gate_proj", 0)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    recipe.linear_autograd(xg, wg, ctx).backward(dy)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.linear(xt, wt).backward(dy)
    assert torch.allclose(xg.grad, xt.grad, atol=1e-5) and torch.allclose(wg.grad, wt.grad, atol=1e-4)
    qw = QuantizedWeight.quantize(w, "fp8")  # frozen base weight: only dx
    xq = x.clone().requires_grad_()
    recipe.linear_autograd(xq, qw, ctx).backward(dy)
    assert torch.allclose(xq.grad, dy @ qw.dequantize(torch.float32), atol=1e-5)


def test_describe_says_what_runs():
    assert "BF16" in Recipe("bf16").describe("cpu")
    fp8_text = Recipe("fp8-hybrid", skip_quant_first_layers=1).describe("cpu")
    assert "emulation" in fp8_text and "E5M2" in fp8_text and "first 1" in fp8_text
    assert "_scaled_mm" in Recipe("fp8-hybrid", gemm="scaled_mm").describe("cpu")
    nv = Recipe("nvfp4").describe("cpu")
    assert "No FP4 GEMM" in nv and "dequantised" in nv


def test_state_dict_resumes(generator):
    x, w, dy = inputs(generator)
    recipe = Recipe("fp8-hybrid", n_layers=1, amax_history_len=8)
    ctx = recipe.linear("q_proj", 0)
    recipe.forward(x, w, ctx)
    recipe.after_optimizer_step()
    recipe.forward(x * 3, w, ctx)
    saved = copy.deepcopy(recipe.state_dict())
    resumed = Recipe("fp8-hybrid", n_layers=1, amax_history_len=8)
    resumed.load_state_dict(saved)
    ctx2 = resumed.linear("q_proj", 0)
    recipe.after_optimizer_step()
    resumed.after_optimizer_step()
    assert torch.equal(recipe.forward(x, w, ctx), resumed.forward(x, w, ctx2))


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_fp8_hybrid_on_gpu_uses_scaled_mm(generator):
    x, w, dy = inputs(generator, m=(4, 1024), k=4096, n=4096, dtype=torch.bfloat16, device="cuda")
    auto = Recipe("fp8-hybrid", n_layers=1)
    emulate = Recipe("fp8-hybrid", n_layers=1, gemm="emulate")
    assert "_scaled_mm" in auto.describe("cuda") and "sm_" in auto.describe("cuda")
    got = run(auto, auto.linear("q_proj", 0), x, w, dy)
    want = run(emulate, emulate.linear("q_proj", 0), x, w, dy)
    for a, b, name in zip(got, want, ("y", "dx", "dW"), strict=True):
        assert_close(a, b.double(), torch.bfloat16, name, factor=2.0)
    y64, dx64, dw64 = float64_truth(x, w, dy)
    assert rel_err(got[0], y64) < 0.06 and rel_err(got[1], dx64) < 0.1 and rel_err(got[2], dw64) < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("one_d_weights", [False, True])
def test_nvfp4_recipe_on_gpu_matches_cpu(one_d_weights, generator):
    """The same NVFP4 operands (kernels are bit-identical to the references); the GPU multiplies them in BF16,
    the CPU in fp32: results agree to bf16 rounding. With and without fp4_disable_2d_quantization."""
    x, w, dy = inputs(generator, m=(2, 1000), k=2048, n=1024, dtype=torch.bfloat16)
    outs = []
    for device in ("cpu", "cuda"):
        recipe = Recipe("nvfp4", n_layers=1, seed=5, fp4_disable_2d_quantization=one_d_weights)
        outs.append(run(recipe, recipe.linear("up_proj", 0), x.to(device), w.to(device), dy.to(device)))
    for a, b, name in zip(*outs, ("y", "dx", "dW"), strict=True):
        assert_close(b.cpu(), a.double(), torch.bfloat16, name, factor=2.0)


# ------------------------------------------------------------------------------------------ fp8 weight cache
def _steps(recipe, ctx, x, w, dy, update):
    """Two optimizer steps of forward + backward with an in-between weight update; -> the six results."""
    out = list(run(recipe, ctx, x, w, dy))
    update(w)
    recipe.after_optimizer_step()
    return out + list(run(recipe, ctx, x, w, dy))


@pytest.mark.parametrize("source", ["parameter", "alias"])
@pytest.mark.parametrize("how", ["torch in place", "untracked write (as the fused AdamW kernel)"])
def test_fp8_weight_cache_equals_quantising_per_gemm(how, source, generator):
    """Cached weight codes give bit-identical GEMMs to quantising W for every GEMM, also after the weights change:
    by torch in-place ops (the version counter) or by a write torch does not see (w.data: the trainer's Numba
    AdamW), which after_optimizer_step re-quantises in place for parameters, and marks stale for other tensors
    (a ZeRO-3 gathered copy: re-quantised at its next use)."""
    x, w, dy = inputs(generator)
    make = torch.nn.Parameter if source == "parameter" else (lambda t: t.requires_grad_(False))

    def update(p):
        with torch.no_grad():
            (p if how == "torch in place" else p.data).mul_(1.5).add_(0.01)

    outs = []
    for cache in (True, False):
        p = make(w.clone())
        recipe = Recipe("fp8-hybrid", n_layers=1, cache_weights=cache)
        outs.append(_steps(recipe, recipe.linear("q_proj", 0), x, p, dy, update))
        assert bool(recipe._weights) == cache
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_fp8_frozen_weight_is_quantised_once(generator, monkeypatch):
    x, w, dy = inputs(generator)
    base = torch.nn.Parameter(w.clone(), requires_grad=False)  # a LoRA base weight
    recipe = Recipe("fp8-hybrid", n_layers=1)
    ctx = recipe.linear("q_proj", 0)
    calls = []
    encode_both = fp8.encode_both
    monkeypatch.setattr(fp8, "encode_both", lambda *a, **k: calls.append(a[0].shape) or encode_both(*a, **k))
    for _ in range(3):
        recipe.forward(x, base, ctx)
        recipe.backward(dy, x, base, ctx, need_dw=False)
        recipe.after_optimizer_step()
    assert calls == [w.shape]  # the weight once; dy took encode (dgrad only)
    with torch.no_grad():
        base.mul_(2.0)  # changed where torch sees it: re-quantised at the next use
    y = recipe.forward(x, base, ctx)
    assert calls == [w.shape, w.shape]
    fresh = Recipe("fp8-hybrid", n_layers=1, cache_weights=False)
    fresh.load_state_dict(recipe.state_dict())
    assert torch.equal(y, fresh.forward(x, base, fresh.linear("q_proj", 0)))


def test_fp8_gradient_scaling_delayed_and_current(generator):
    """delayed: dy encoded at the scale of earlier steps (just in time before the first step), its amax recorded
    for the next; current: a just-in-time scale from max|dy|. Both within FP8's error of float64, and alike."""
    x, w, dy = inputs(generator)
    _, dx64, dw64 = float64_truth(x, w, dy)
    results = {}
    for mode in ("delayed", "current"):
        recipe = Recipe("fp8-hybrid", n_layers=1, grad_scaling=mode)
        ctx = recipe.linear("o_proj", 0)
        first = run(recipe, ctx, x, w, dy)
        recipe.after_optimizer_step()
        results[mode] = (first, run(recipe, ctx, x, w, dy))
        for _, dx, dw in results[mode]:
            assert rel_err(dx, dx64) < 0.1 and rel_err(dw, dw64) < 0.1
        if mode == "delayed":
            gs = recipe._delayed_scaling("cpu", grad=True)
            assert gs.scale[0].item() == (torch.tensor(57344.0) / dy.abs().max()).item()
            assert "grad_scale" in recipe.state_dict() and "grad_amax_history" in recipe.state_dict()
    sdy = fp8.scale_from_amax(dy.abs().max(), "e5m2")
    dyq = fp8.decode(fp8.encode(dy.reshape(-1, 48), sdy, "e5m2"), sdy, "e5m2", torch.float64)
    first_dx = results["delayed"][0][1].reshape(-1, 64)
    wq = fp8.decode(*fp8.quantize(w), "e4m3", torch.float64)
    assert rel_err(first_dx, dyq @ wq) < 1e-6  # step 1: just in time
    # both steps: the delayed scale is the same max|dy| the current scaling computes: the same dx and dW
    for step in (0, 1):
        assert torch.equal(results["delayed"][step][1], results["current"][step][1])
        assert torch.equal(results["delayed"][step][2], results["current"][step][2])
    with pytest.raises(ValueError, match="grad_scaling"):
        Recipe("fp8-hybrid", grad_scaling="jit")


@pytest.mark.gpu
def test_fp8_weight_cache_under_cuda_graphs(generator):
    """A captured forward + backward reads the cached weight codes; after an untracked weight update (as the fused
    AdamW kernel writes) after_optimizer_step re-quantises them in place, so the replay equals an uncached eager
    run on the new weights, bit for bit."""
    x, w, dy = inputs(generator, m=(2, 256), k=512, n=256, dtype=torch.bfloat16, device="cuda")
    p = torch.nn.Parameter(w.clone())
    recipe = Recipe("fp8-hybrid", n_layers=1)
    ctx = recipe.linear("up_proj", 0)
    out = {}

    def step():
        out["y"] = recipe.forward(x, p, ctx)
        out["dx"], out["dw"] = recipe.backward(dy, x, p, ctx)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # creates the cache and the scaling state
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    p.data.mul_(-1.25)  # not seen by the version counter
    recipe.after_optimizer_step()
    graph.replay()
    torch.cuda.synchronize()
    ref = Recipe("fp8-hybrid", n_layers=1, cache_weights=False)
    ref.load_state_dict(recipe.state_dict())
    rctx = ref.linear("up_proj", 0)
    y = ref.forward(x, p, rctx)
    dx, dw = ref.backward(dy, x, p, rctx)
    assert torch.equal(out["y"], y) and torch.equal(out["dx"], dx) and torch.equal(out["dw"], dw)


def test_scaled_mm_gets_16_byte_aligned_scales(generator, monkeypatch):
    """cuBLASLt refuses FP8 GEMMs whose scale pointers are not 16-byte aligned; the delayed-scaling slots are views
    at 4-byte steps into one vector. Every scale handed to torch._scaled_mm, for every slot, forward and backward,
    must be aligned (checked by wrapping torch._scaled_mm; the CPU implementation computes the product)."""
    real = torch._scaled_mm
    seen = []

    def checking_scaled_mm(a, b, *, scale_a, scale_b, **kw):
        seen.append((scale_a.data_ptr() % 16, scale_b.data_ptr() % 16))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", checking_scaled_mm)
    x, w, dy = inputs(generator)
    recipe = Recipe("fp8-hybrid", n_layers=2, gemm="scaled_mm")
    for name in ("q_proj", "o_proj", "up_proj"):
        for layer in (0, 1):
            run(recipe, recipe.linear(name, layer), x, w, dy)
    assert len(seen) == 3 * 2 * 3 and all(s == (0, 0) for s in seen), seen


def test_nvfp4_dgrad_is_unbiased_across_optimizer_steps(generator):
    """The NVFP4 dgrad is dequant(SR(dy)) @ dequant(Q2d(W)): averaged over optimizer steps (a new SR seed each) it
    converges to the GEMM with exact dy and the forward's quantised weight, its error falling like 1 / sqrt(steps).
    A biased rounding or a seed that does not advance leaves the mean as far off as one draw. Heavy-tailed dy rows
    (a few tokens with large gradients, most small) as late in training."""
    x, w, dy = inputs(generator, m=(2, 32), k=64, n=48)
    dy = dy * torch.exp(2 * torch.randn(2, 32, 1, generator=generator))
    recipe = Recipe("nvfp4", n_layers=1, seed=7)
    ctx = recipe.linear("o_proj", 0)
    wq = nvfp4.dequantize(nvfp4.quantize(w, block_2d=True), torch.float64)
    target = dy.double().reshape(-1, 48) @ wq
    k = 64
    total = torch.zeros_like(target)
    single = []
    for _ in range(k):
        dx = recipe.dgrad(dy, w, ctx).double().reshape(-1, 64)
        single.append(rel_err(dx, target))
        total += dx
        recipe.after_optimizer_step()
    one = sum(single) / k
    assert 0.02 < one < 0.3  # SR noise is there ...
    assert rel_err(total / k, target) < 2.5 * one / k**0.5  # ... and averages out (unbiased: ~one / 8)


def test_scaled_mm_refusal_falls_back_to_emulation(generator, monkeypatch):
    """If cuBLASLt refuses an FP8 GEMM (CUBLAS_STATUS_NOT_SUPPORTED, outside a graph capture), the recipe warns once
    and emulates from then on: the same numbers as the emulated recipe. Other errors are raised."""
    x, w, dy = inputs(generator)
    ref = Recipe("fp8-hybrid", n_layers=1, gemm="emulate")
    expected = run(ref, ref.linear("o_proj", 0), x, w, dy)

    def refusing(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")

    monkeypatch.setattr(torch, "_scaled_mm", refusing)
    recipe = Recipe("fp8-hybrid", n_layers=1, gemm="scaled_mm")
    with pytest.warns(UserWarning, match="Falling back to the exact emulation"):
        got = run(recipe, recipe.linear("o_proj", 0), x, w, dy)
    assert recipe.gemm == "emulate"
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    other = Recipe("fp8-hybrid", n_layers=1, gemm="scaled_mm")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(other, other.linear("o_proj", 0), x, w, dy)
