import math

import pytest
import torch

from surogate.kernels import adamw_step, clip_scale, global_grad_norm
from surogate.kernels.ops import adamw
from surogate.kernels.testing import assert_close, randn

HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
LR = 1e-2


def run(update, n, grad_dtype, generator, steps=3, device="cpu", grad_scale=None, work=None, tensor_scalars=False):
    """`steps` AdamW steps with `update` and with torch.optim.AdamW in float64 from the same start and grads."""
    params = randn(n, generator=generator).to(device)
    exp_avg = torch.zeros(n, device=device)
    exp_avg_sq = torch.zeros(n, device=device)
    work_params = torch.empty(n, dtype=torch.bfloat16, device=device) if work else None
    p64 = torch.nn.Parameter(params.double().cpu())
    optimizer = torch.optim.AdamW([p64], lr=LR, betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                  weight_decay=HYPER["weight_decay"])
    for step in range(1, steps + 1):
        grads = randn(n, dtype=grad_dtype, generator=generator).to(device)
        scale = None if grad_scale is None else torch.tensor(grad_scale, device=device)
        lr = torch.tensor(LR, device=device) if tensor_scalars else LR
        t = torch.tensor(step, device=device) if tensor_scalars else step
        update(params, grads, exp_avg, exp_avg_sq, lr=lr, step=t, grad_scale=scale, work_params=work_params,
               stochastic_rounding=work == "stochastic", seed=1234, **HYPER)
        p64.grad = grads.double().cpu() * (1.0 if grad_scale is None else grad_scale)
        optimizer.step()
    state = optimizer.state[p64]
    assert_close(params, p64.detach(), torch.float32, "params")
    assert_close(exp_avg, state["exp_avg"], torch.float32, "exp_avg")
    assert_close(exp_avg_sq, state["exp_avg_sq"], torch.float32, "exp_avg_sq")
    if work == "nearest":
        assert torch.equal(work_params, params.to(torch.bfloat16))
    elif work == "stochastic":
        assert torch.equal(work_params.cpu(), adamw.reference_round_stochastic(params.cpu(), steps, 1234))
    return params, work_params


CASES = [(100, None, None), (37, 0.25, "nearest"), (64, None, "stochastic"), (1, 0.5, None)]


@pytest.mark.parametrize("n,grad_scale,work", CASES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_torch_adamw(n, grad_scale, work, grad_dtype, generator):
    run(adamw.reference_update, n, grad_dtype, generator, grad_scale=grad_scale, work=work,
        tensor_scalars=n % 2 == 1)


def test_stochastic_rounding_is_unbiased_and_brackets_the_value(generator):
    # values strictly between two bf16 neighbours; mean over 1000 seeds ~ the value (std of the mean < ulp / 63)
    x = (1 + torch.rand(64, generator=generator)) * torch.where(torch.rand(64, generator=generator) < 0.5, -1, 1)
    draws = torch.stack([adamw.reference_round_stochastic(x, 7, seed).float() for seed in range(1000)])
    down = x.to(torch.bfloat16).float()  # nearest; the other neighbour is one bf16 ulp away
    ulp = 2.0 ** (torch.floor(torch.log2(x.abs())) - 7)
    assert ((draws - x).abs() < ulp).all()
    assert ((draws.mean(0) - x).abs() < ulp / 10).all()
    assert not torch.equal(draws[0], down) or not torch.equal(draws[1], down)  # not always round-to-nearest


def test_public_step_rejects_mismatched_buffers(generator):
    params, grads = randn(10, generator=generator), randn(10, generator=generator)
    with pytest.raises(ValueError, match="exp_avg must be a flat contiguous buffer of 10"):
        adamw_step(params, grads, torch.zeros(9), torch.zeros(10), lr=LR, step=1, **HYPER)
    with pytest.raises(ValueError, match="work_params"):
        adamw_step(params, grads, torch.zeros(10), torch.zeros(10), lr=LR, step=1, work_params=torch.zeros(10),
                   **HYPER)


@pytest.mark.parametrize("n", [1, 37, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_grad_norm_and_clip(n, dtype, generator):
    g = randn(n, dtype=dtype, generator=generator)
    norm = global_grad_norm(g)
    assert norm.shape == () and norm.dtype == torch.float32
    assert_close(norm, g.double().norm(), torch.float32, "norm")
    max_norm = 0.5 * norm.item()
    expected = torch.tensor(max_norm / (norm.double().item() + 1e-6), dtype=torch.float64)
    assert_close(clip_scale(norm, max_norm), expected, torch.float32, "clip")
    assert clip_scale(norm, 2 * norm.item()).item() == 1.0


@pytest.mark.sim
@pytest.mark.parametrize("n,grad_scale,work", CASES + [(2050, None, "stochastic")])  # 2050: 3 blocks
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_kernel_in_simulator(n, grad_scale, work, grad_dtype, generator):
    run(adamw.update, n, grad_dtype, generator, grad_scale=grad_scale, work=work, tensor_scalars=n % 2 == 1)


@pytest.mark.sim
@pytest.mark.parametrize("n", [1, 37, 100, 5000])  # 5000: several blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_norm_in_simulator(n, dtype, generator):
    g = randn(n, dtype=dtype, generator=generator)
    assert_close(adamw.grad_norm(g), g.double().norm(), torch.float32, "norm")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [50_000_000, 50_000_001])
@pytest.mark.parametrize("grad_dtype,work", [(torch.float32, None), (torch.bfloat16, "nearest"),
                                             (torch.bfloat16, "stochastic")])
def test_kernel_on_gpu(n, grad_dtype, work, generator):
    run(adamw_step, n, grad_dtype, generator, device="cuda", grad_scale=0.7, work=work, tensor_scalars=True)
    g = randn(n, dtype=grad_dtype, generator=generator).cuda()
    assert_close(global_grad_norm(g), g.double().norm(), torch.float32, "norm")


@pytest.mark.gpu
def test_step_replays_in_a_cuda_graph(generator):
    """lr, step and the clip factor live on the device: the captured step replays with new values, no host sync."""
    n = 1 << 20
    params, grads = randn(n, generator=generator).cuda(), randn(n, generator=generator).cuda()
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    work = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    lr, step = torch.tensor(LR, device="cuda"), torch.tensor(1.0, device="cuda")
    expected = [t.clone() for t in (params, m, v)]

    def body():
        scale = clip_scale(global_grad_norm(grads), 100.0)
        adamw_step(params, grads, m, v, lr=lr, step=step, grad_scale=scale, work_params=work, **HYPER)

    body()  # compile and warm up outside the capture
    adamw.reference_update(*expected[:1], grads, *expected[1:], lr=LR, step=1,
                           grad_scale=clip_scale(grads.norm(), 100.0), **HYPER)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for t in (2, 3):
        step.fill_(t)
        lr.fill_(LR / t)
        graph.replay()
        adamw.reference_update(*expected[:1], grads, *expected[1:], lr=LR / t, step=t,
                               grad_scale=clip_scale(grads.norm(), 100.0), **HYPER)
    torch.cuda.synchronize()
    for got, want, name in zip((params, m, v), expected, ("params", "exp_avg", "exp_avg_sq"), strict=True):
        assert_close(got, want, torch.float32, name)
    assert torch.equal(work, params.to(torch.bfloat16))
    assert math.isfinite(params.sum().item())
