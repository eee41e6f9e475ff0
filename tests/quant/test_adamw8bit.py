import copy

import pytest
import torch

from surogate.quant import dynamic8
from surogate.quant.optim import AdamW8bit, AdamW8bitState, adamw8bit_step
from surogate.quant.optim import adamw8bit as impl

# fp32 rounding of map value * absmax and of the fp32 update, relative to the block absmax (a few 2^-24)
FP32_SLACK = 1e-6


def half_gap(signed: bool) -> float:
    """Half the widest gap of a dynamic map: the largest round-trip error relative to the block absmax (the signed
    map's widest gap, 0.0141 near +-1, also bounds -1 -> -0.99297, its most negative value)."""
    q = dynamic8.dynamic_map(signed)
    return float((q[1:] - q[:-1]).max()) / 2


def poisoned_work(n, device="cpu"):
    """A bf16 work buffer of NaN sentinels (not torch.empty): an element a step fails to write stays NaN."""
    return torch.full((n,), float("nan"), dtype=torch.bfloat16, device=device)


def random_states(n, generator):
    m = torch.randn(n, generator=generator) * 1e-3
    m[::997] *= 50  # outliers set some blocks' absmax
    v = torch.rand(n, generator=generator) * 1e-6 + m * m
    return m, v


def block_absmax(x):
    n_blocks = -(-x.numel() // impl.BLOCK)
    padded = torch.zeros(n_blocks * impl.BLOCK, dtype=torch.float64)
    padded[: x.numel()] = x.double().abs()
    return padded.view(n_blocks, impl.BLOCK).amax(1).repeat_interleave(impl.BLOCK)[: x.numel()]


def test_state_round_trip_bounds(generator):
    m, v = random_states(5000, generator)
    state = AdamW8bitState.quantize(m, v)
    assert state.m_codes.dtype == torch.uint8 and state.m_absmax.shape == (3,)
    assert state.nbytes == 2 * 5000 + 2 * 3 * 4
    m_hat, v_hat = state.dequantize()
    # per element: half a map gap of the block absmax (+ fp32 rounding of the scaling)
    assert ((m_hat.double() - m.double()).abs() <= block_absmax(m) * (half_gap(True) + FP32_SLACK)).all()
    assert ((v_hat.double() - v.double()).abs() <= block_absmax(v) * (half_gap(False) + FP32_SLACK)).all()
    # the dynamic map keeps small values relatively precise: measured ~1.5e-2 (m) and ~4e-3 (v) relative Frobenius
    assert ((m_hat - m).norm() / m.norm()).item() < 3e-2
    assert ((v_hat - v).norm() / v.norm()).item() < 1e-2
    zeros = AdamW8bitState.zeros(10).dequantize()
    assert torch.equal(zeros[0], torch.zeros(10)) and torch.equal(zeros[1], torch.zeros(10))


def float64_adamw(p, g, m, v, *, lr, b1, b2, eps, wd, step):
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * wd) - lr / (1 - b1**step) * m / (v.sqrt() / (1 - b2**step) ** 0.5 + eps)
    return p, m, v


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_reference_step_matches_float64(grad_dtype, generator):
    n = 3000
    m, v = random_states(n, generator)
    state = AdamW8bitState.quantize(m, v)
    m0, v0 = state.dequantize()
    p = torch.randn(n, generator=generator)
    g = (torch.randn(n, generator=generator) * 1e-2).to(grad_dtype)
    g[7] = float("nan")
    g[8] = float("inf")
    hp = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, step=5)
    p64, m64, v64 = float64_adamw(p, g.float() * 0.5, m0, v0, **hp)
    p_new, work = p.clone(), poisoned_work(n)
    adamw8bit_step(
        p_new,
        g,
        state,
        lr=1e-3,
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        step=5,
        grad_scale=torch.tensor(0.5),
        work_params=work,
    )
    ok = torch.ones(n, dtype=torch.bool)
    ok[7:9] = False
    assert torch.equal(p_new[~ok], p[~ok])  # NaN / inf gradients: the element is skipped
    assert ((p_new.double() - p64).abs() <= 1e-6 * p64.abs() + 1e-9)[ok].all()
    assert torch.equal(work, p_new.bfloat16())
    m1, v1 = state.dequantize()
    m64 = torch.where(ok, m64, m0.double())
    v64 = torch.where(ok, v64, v0.double())
    assert ((m1.double() - m64).abs() <= block_absmax(m64) * (half_gap(True) + FP32_SLACK)).all()
    assert ((v1.double() - v64).abs() <= block_absmax(v64) * (half_gap(False) + FP32_SLACK)).all()


def train(make_optimizer, steps, seed=0, device="cpu"):
    """A 2-layer MLP regression (32 -> 128 -> 8, 5.2k params: several 2048-blocks); returns the loss curve."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    teacher = torch.randn(32, 8, generator=g) / 32**0.5
    y = (torch.tanh(x @ teacher) + 0.01 * torch.randn(256, 8, generator=g)).to(device)
    x = x.to(device)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).to(device)
    opt = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_tracks_fp32_adamw_on_regression():
    """150 steps, lr 3e-3, wd 0.01; the loss falls ~100x. From step 50 on, the 8-bit loss stays within 20% of fp32
    AdamW's (measured: 9%, the 8-bit curve slightly below), and ends within 15% (or below)."""
    hp = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ref = train(lambda ps: torch.optim.AdamW(ps, **hp), 150)
    ours = train(lambda ps: AdamW8bit(ps, **hp), 150)
    print("fp32", ref[::15].tolist(), "\n8-bit", ours[::15].tolist())
    assert ref[-1] < ref[0] / 50 and ours[-1] < ours[0] / 50
    gap = ((ours - ref).abs() / ref)[50:].max().item()
    print("max relative gap from step 50:", gap)
    assert gap < 0.2
    assert ours[-1] < 1.15 * ref[-1]


def test_optimizer_state_dict_resumes_exactly(generator):
    w = torch.nn.Parameter(torch.randn(3000, generator=generator))
    opt = AdamW8bit([w], lr=1e-2)
    for _ in range(3):
        w.grad = torch.randn(3000, generator=generator)
        opt.step()
    saved, w_saved = copy.deepcopy(opt.state_dict()), w.detach().clone()  # state_dict() shares the tensors
    grad = torch.randn(3000, generator=generator)
    w.grad = grad
    opt.step()
    w2 = torch.nn.Parameter(w_saved.clone())
    opt2 = AdamW8bit([w2], lr=1e-2)
    opt2.load_state_dict(saved)
    w2.grad = grad
    opt2.step()
    assert torch.equal(w, w2)
    with pytest.raises(ValueError, match="fp32"):
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        AdamW8bit([p]).step()


# ---------------------------------------------------------------------------------------------------- kernels
def check_kernel(n, grad_dtype, generator, device):
    """The kernel against the reference. The kernel's FMAs leave some masters one fp32 ulp from the reference's; a
    few of those lie across a bf16 rounding midpoint, so the work copies may differ by one bf16 ulp, up to 2^-7
    relative (at n = 2^23 + 123 an fp64 emulation of the FMA on the CPU gives 25% of masters off by an ulp and 32
    work copies a bf16 ulp apart: the former 2^-8 bound failed on the H100). Each work copy must equal bf16(its own
    master) exactly, skipped (NaN-gradient) elements included."""
    m, v = random_states(n, generator)
    ref_state = AdamW8bitState.quantize(m, v)
    state = AdamW8bitState(*(t.clone().to(device) for t in ref_state.__dict__.values()))
    p = torch.randn(n, generator=generator)
    g = (torch.randn(n, generator=generator) * 1e-2).to(grad_dtype)
    g[1] = float("nan")
    hyper = impl.hyper_parameters(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=7, grad_scale=0.7)
    p_ref, work_ref = p.clone(), poisoned_work(n)
    impl.reference_step(p_ref, g, ref_state, hyper, work_ref)
    p_dev, work = p.clone().to(device), poisoned_work(n, device)
    impl.step_kernel(p_dev, g.to(device), state, hyper.to(device), work)
    # the kernel fuses multiply-adds (FMA), the reference does not: fp32 rounding apart, codes within one step
    assert ((p_dev.cpu() - p_ref).abs() <= 1e-6 * p_ref.abs() + 1e-9).all()
    assert p_dev[1].item() == p[1].item()
    assert torch.equal(work.cpu(), p_dev.cpu().bfloat16())  # NaN sentinels: an unwritten element fails here
    assert torch.equal(work_ref, p_ref.bfloat16())
    assert ((work.cpu().float() - work_ref.float()).abs() <= work_ref.float().abs() * 2.0**-7).all()  # 1 bf16 ulp
    for name in ("m_codes", "v_codes"):
        diff = (getattr(state, name).cpu().int() - getattr(ref_state, name).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, name
    for name in ("m_absmax", "v_absmax"):
        assert torch.allclose(getattr(state, name).cpu(), getattr(ref_state, name), rtol=1e-6, atol=0)


@pytest.mark.sim
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_simulator(grad_dtype, generator):
    check_kernel(2048 + 300, grad_dtype, generator, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(grad_dtype, generator):
    check_kernel((1 << 23) + 123, grad_dtype, generator, "cuda")


@pytest.mark.gpu
def test_optimizer_on_gpu_tracks_cpu():
    hp = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    cpu = train(lambda ps: AdamW8bit(ps, **hp), 50)
    gpu = train(lambda ps: AdamW8bit(ps, **hp), 50, device="cuda")
    # cuBLAS vs CPU GEMMs, FMAs in the kernel and the odd state code rounded the other way: drift, no divergence
    assert ((gpu - cpu).abs() / cpu).max() < 5e-2
