import numpy as np
import pytest
import torch
from numba import cuda

from surogate.kernels import rope_backward, rope_forward, rope_inv_freq
from surogate.kernels.ops import rope
from surogate.kernels.testing import assert_close, randn
from surogate.kernels.torch import RoPEFunction, RotaryEmbedding, apply_rope

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# (n_q, n_kv, head_dim, theta, rope_scaling): Qwen3 0.6B/1.7B, Qwen3 4B/8B, Llama-3.1-8B, Llama-3.2-1B (head_dim 64)
GPU_MODELS = [
    (16, 8, 128, 1e6, None),
    (32, 8, 128, 1e6, None),
    (32, 8, 128, 5e5, LLAMA3),
    (32, 8, 64, 5e5, LLAMA3),
]


def float64_truth(qkv, position_ids, inv_freq, n_q, n_kv, head_dim, dy):
    """Rotated qkv and its gradient by float64 autograd of HF's formula x * cos + rotate_half(x) * sin (the angle in
    fp32, as HF and the kernels form it; cos and sin of it in float64)."""
    tokens = qkv.shape[0]
    angle = (position_ids.reshape(-1, 1).float() * inv_freq.reshape(1, -1)).double()
    emb = torch.cat([angle, angle], dim=-1).unsqueeze(1)  # [tokens, 1, head_dim]
    x = qkv.double().view(tokens, n_q + 2 * n_kv, head_dim).requires_grad_()
    rot = x[:, : n_q + n_kv]
    rotate_half = torch.cat([-rot[..., head_dim // 2 :], rot[..., : head_dim // 2]], dim=-1)
    out = torch.cat([rot * emb.cos() + rotate_half * emb.sin(), x[:, n_q + n_kv :]], dim=1).reshape(tokens, -1)
    out.backward(dy.double())
    return out.detach(), x.grad.reshape(tokens, -1)


def packed_documents(tokens, generator, max_position=32768):
    """Position ids of documents packed back to back: each restarts at a random offset."""
    pos = torch.empty(tokens, dtype=torch.int64)
    start = 0
    while start < tokens:
        length = int(torch.randint(1, max(2, tokens // 3 + 1), (1,), generator=generator))
        offset = int(torch.randint(0, max_position - length, (1,), generator=generator))
        end = min(tokens, start + length)
        pos[start:end] = torch.arange(offset, offset + end - start)
        start = end
    return pos


def check(forward, backward, tokens, n_q, n_kv, head_dim, dtype, generator, device="cpu", theta=1e6,
          rope_scaling=None, pos_dtype=torch.int64, max_position=32768):
    width = (n_q + 2 * n_kv) * head_dim
    qkv = randn(tokens, width, dtype=dtype, generator=generator)
    dy = randn(tokens, width, dtype=dtype, generator=generator)
    pos = packed_documents(tokens, generator, max_position)
    inv_freq = rope_inv_freq(head_dim, theta, rope_scaling)
    out64, d64 = float64_truth(qkv, pos, inv_freq, n_q, n_kv, head_dim, dy)
    buf = qkv.to(device)
    grad = dy.to(device)
    args = (pos.to(pos_dtype).to(device), inv_freq.to(device), n_q, n_kv, head_dim)
    assert forward(buf, *args) is buf, "the forward rotates qkv in place"
    assert backward(grad, *args) is grad, "the backward rotates d_qkv in place"
    v = slice((n_q + n_kv) * head_dim, width)
    assert torch.equal(buf[:, v].cpu(), qkv[:, v]), "v is untouched"
    assert torch.equal(grad[:, v].cpu(), dy[:, v]), "v's gradient passes through"
    assert_close(buf, out64, dtype, "rotated qkv")
    assert_close(grad, d64, dtype, "d_qkv")


@pytest.mark.parametrize(
    "tokens,n_q,n_kv,head_dim", [(1, 1, 0, 2), (7, 3, 1, 10), (33, 4, 2, 64), (64, 16, 8, 128), (5, 2, 1, 80)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(tokens, n_q, n_kv, head_dim, dtype, generator):
    check(rope.reference_forward, rope.reference_backward, tokens, n_q, n_kv, head_dim, dtype, generator)


def test_reference_llama3_scaling_and_int32_positions(generator):
    check(rope.reference_forward, rope.reference_backward, 40, 4, 2, 64, torch.float32, generator, theta=5e5,
          rope_scaling=LLAMA3, pos_dtype=torch.int32)


def test_public_functions_take_batch_dims(generator):
    qkv = randn(2, 3, 4 * 8, generator=generator)
    pos = torch.arange(6).view(2, 3)
    inv_freq = rope_inv_freq(8, 1e4)
    out64, _ = float64_truth(qkv.view(6, -1), pos, inv_freq, 2, 1, 8, torch.zeros(6, 32))
    out = rope_forward(qkv.clone(), pos, inv_freq, 2, 1, 8)
    assert out.shape == (2, 3, 32)
    assert_close(out.view(6, -1), out64, torch.float32, "rotated")
    back = rope_backward(out, pos, inv_freq, 2, 1, 8)
    assert_close(back, qkv, torch.float32, "rotating back restores the input")


# ---------------------------------------------------------------------------------------------------- inv_freq
def _hf_inv_freq(head_dim, theta, rope_scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})}
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=131072, rope_parameters=params)
    return LlamaRotaryEmbedding(config), config


@pytest.mark.parametrize(
    "head_dim,theta,rope_scaling",
    [(128, 1e6, None), (64, 1e4, None), (128, 5e5, LLAMA3), (64, 5e5, LLAMA3), (64, 1e4, {"rope_type": "linear",
                                                                                            "factor": 4.0})],
)
def test_inv_freq_equals_transformers(head_dim, theta, rope_scaling):
    hf, _ = _hf_inv_freq(head_dim, theta, rope_scaling)
    ours = rope_inv_freq(head_dim, theta, rope_scaling)
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    assert torch.equal(ours, hf.inv_freq), "same fp32 operations as HF, so the same bits"


def test_inv_freq_llama3_bands():
    """Llama 3.1's rule, checked independently: long wavelengths divided by factor, short ones kept."""
    import math

    plain = rope_inv_freq(128, 5e5)
    scaled = rope_inv_freq(128, 5e5, LLAMA3)
    wavelen = 2 * math.pi / plain
    long = wavelen > 8192 / 1.0
    short = wavelen < 8192 / 4.0
    assert long.any() and short.any() and (~long & ~short).any()
    assert torch.equal(scaled[short], plain[short])
    assert torch.allclose(scaled[long], plain[long] / 8.0, rtol=1e-6)
    middle = ~long & ~short
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8.0)).all()
    legacy = {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}
    assert torch.equal(rope_inv_freq(128, 5e5, legacy), scaled), "the older 'type' key"


def test_inv_freq_errors():
    with pytest.raises(ValueError, match="even head_dim"):
        rope_inv_freq(7, 1e4)
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        rope_inv_freq(64, 1e4, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="needs the key 'low_freq_factor'"):
        rope_inv_freq(64, 1e4, {"rope_type": "llama3", "factor": 8.0})


def test_bad_arguments_raise():
    inv_freq = rope_inv_freq(8, 1e4)
    pos = torch.arange(3)
    with pytest.raises(ValueError, match=r"\[tokens, 32\]"):
        rope_forward(torch.zeros(3, 30), pos, inv_freq, 2, 1, 8)
    with pytest.raises(ValueError, match="contiguous"):
        rope_forward(torch.zeros(32, 3).t(), pos, inv_freq, 2, 1, 8)
    with pytest.raises(ValueError, match="one integer per token"):
        rope_forward(torch.zeros(3, 32), torch.arange(4), inv_freq, 2, 1, 8)
    with pytest.raises(ValueError, match="inv_freq must be fp32"):
        rope_forward(torch.zeros(3, 32), pos, inv_freq.double(), 2, 1, 8)
    with pytest.raises(ValueError, match="even head_dim"):
        rope_forward(torch.zeros(3, 28), pos, inv_freq, 2, 1, 7)


# ---------------------------------------------------------------------------------------------------- transformers
def _hf_rotate(q, k, pos, head_dim, theta, rope_scaling):
    """q [tokens, heads, d], k [tokens, kv_heads, d] rotated by transformers' LlamaRotaryEmbedding and
    apply_rotary_pos_emb (HF layout [batch, heads, seq, d])."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf, _ = _hf_inv_freq(head_dim, theta, rope_scaling)
    cos, sin = hf(q, pos.view(1, -1))
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)


def check_against_transformers(forward, tokens, n_q, n_kv, head_dim, theta, rope_scaling, generator, device="cpu"):
    pytest.importorskip("transformers")
    qkv = randn(tokens, (n_q + 2 * n_kv) * head_dim, generator=generator)
    pos = packed_documents(tokens, generator)
    heads = qkv.view(tokens, n_q + 2 * n_kv, head_dim)
    q_hf, k_hf = _hf_rotate(heads[:, :n_q], heads[:, n_q : n_q + n_kv], pos, head_dim, theta, rope_scaling)
    inv_freq = rope_inv_freq(head_dim, theta, rope_scaling).to(device)
    out = forward(qkv.to(device), pos.to(device), inv_freq, n_q, n_kv, head_dim).cpu().view(tokens, -1, head_dim)
    assert_close(out[:, :n_q], q_hf, torch.float32, "q vs transformers")
    assert_close(out[:, n_q : n_q + n_kv], k_hf, torch.float32, "k vs transformers")


@pytest.mark.parametrize("rope_scaling,theta", [(None, 1e6), (LLAMA3, 5e5)])
def test_reference_matches_transformers(rope_scaling, theta, generator):
    check_against_transformers(rope.reference_forward, 50, 4, 2, 64, theta, rope_scaling, generator)


# ---------------------------------------------------------------------------------------------------- autograd
def test_apply_rope_and_module_match_float64_autograd(generator):
    tokens, heads, kv_heads, head_dim = 6, 3, 1, 16
    q = randn(2, 3, heads, head_dim, generator=generator)  # [batch, seq, heads, d]
    k = randn(2, 3, kv_heads, head_dim, generator=generator)
    dq = randn(2, 3, heads, head_dim, generator=generator)
    dk = randn(2, 3, kv_heads, head_dim, generator=generator)
    pos = packed_documents(tokens, generator).view(2, 3)
    module = RotaryEmbedding(head_dim, theta=1e4)
    qg = q.clone().requires_grad_()
    kg = k.clone().requires_grad_()
    q_rot, k_rot = module(qg, kg, pos)
    ((q_rot * dq).sum() + (k_rot * dk).sum()).backward()
    for x, dx, rotated, grad in ((q, dq, q_rot, qg.grad), (k, dk, k_rot, kg.grad)):
        n = x.shape[-2]
        out64, d64 = float64_truth(x.reshape(tokens, -1), pos, module.inv_freq, n, 0, head_dim,
                                   dx.reshape(tokens, -1))
        assert_close(rotated.reshape(tokens, -1), out64, torch.float32, "rotated")
        assert_close(grad.reshape(tokens, -1), d64, torch.float32, "grad")
    assert torch.equal(apply_rope(q, pos, module.inv_freq), q_rot.detach())


def test_packed_function_is_out_of_place(generator):
    qkv = randn(4, 4 * 8, generator=generator)
    before = qkv.clone()
    pos = torch.arange(4)
    inv_freq = rope_inv_freq(8, 1e4)
    qkv.requires_grad_()
    out = RoPEFunction.apply(qkv, pos, inv_freq, 2, 1, 8)
    dy = randn(4, 32, generator=generator)
    out.backward(dy)
    assert torch.equal(qkv.detach(), before)
    out64, d64 = float64_truth(before, pos, inv_freq, 2, 1, 8, dy)
    assert_close(out, out64, torch.float32, "out")
    assert_close(qkv.grad, d64, torch.float32, "grad")


# ---------------------------------------------------------------------------------------------------- simulator
@pytest.mark.sim
@pytest.mark.parametrize(
    "tokens,n_q,n_kv,head_dim,dtype",
    [
        (3, 2, 1, 16, torch.float32),  # words of 2 fp32
        (3, 2, 1, 16, torch.bfloat16),  # words of 4 bf16
        (2, 3, 1, 6, torch.bfloat16),  # d/2 = 3: one value per load
        (2, 5, 2, 8, torch.float32),  # 7 rotated heads: several heads a thread
    ],
)
def test_kernel_in_simulator(tokens, n_q, n_kv, head_dim, dtype, generator):
    check(rope.forward, rope.backward, tokens, n_q, n_kv, head_dim, dtype, generator, max_position=1 << 20)


@pytest.mark.sim
def test_sin_cos_in_simulator(generator):
    """The kernels' sin_cos against float64 for angles up to 2^20 (positions of long contexts) and negative ones."""
    from surogate.kernels.ops.rope import sin_cos

    @cuda.jit  # the simulator's jit: `cuda` must be a module global for it to patch
    def kernel(angles, sines, cosines):
        i = cuda.grid(1)
        if i < angles.shape[0]:
            s, c = sin_cos(angles[i])
            sines[i] = s
            cosines[i] = c

    angles = torch.cat([torch.rand(48, generator=generator) * 10, torch.rand(16, generator=generator) * 2**20]).float()
    angles[:4] *= -1
    sines = np.zeros(64, dtype=np.float32)
    cosines = np.zeros(64, dtype=np.float32)
    kernel[1, 64](angles.numpy(), sines, cosines)
    a = angles.double()
    # Cephes' polynomials: < 2 ulp of 1 (the absolute error is what a rotation sees)
    assert np.abs(sines - a.sin().numpy()).max() < 2.5e-7
    assert np.abs(cosines - a.cos().numpy()).max() < 2.5e-7


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n_q,n_kv,head_dim,theta,rope_scaling", GPU_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(n_q, n_kv, head_dim, theta, rope_scaling, dtype, generator):
    check(rope.forward, rope.backward, 4096, n_q, n_kv, head_dim, dtype, generator, device="cuda", theta=theta,
          rope_scaling=rope_scaling)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [80, 6])  # d/2 = 40: words; d/2 = 3: one value per load
def test_kernel_on_gpu_odd_sizes_int32_positions(head_dim, generator):
    check(rope.forward, rope.backward, 1000, 5, 3, head_dim, torch.bfloat16, generator, device="cuda",
          pos_dtype=torch.int32, max_position=1 << 20)


@pytest.mark.gpu
def test_kernel_on_gpu_matches_transformers(generator):
    check_against_transformers(rope.forward, 4096, 32, 8, 128, 5e5, LLAMA3, generator, device="cuda")


@pytest.mark.gpu
def test_module_on_gpu(generator):
    q = randn(2, 2048, 16, 128, generator=generator, dtype=torch.bfloat16).cuda().requires_grad_()
    k = randn(2, 2048, 8, 128, generator=generator, dtype=torch.bfloat16).cuda().requires_grad_()
    pos = torch.arange(2048).repeat(2).view(2, 2048).cuda()
    module = RotaryEmbedding(128, theta=1e6).cuda()
    q_rot, k_rot = module(q, k, pos)
    q_cpu, k_cpu = RotaryEmbedding(128, theta=1e6)(q.detach().cpu(), k.detach().cpu(), pos.cpu())
    assert_close(q_rot, q_cpu, torch.bfloat16, "q")
    assert_close(k_rot, k_cpu, torch.bfloat16, "k")
    (q_rot.float().sum() + k_rot.float().sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
