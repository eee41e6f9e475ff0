import pytest
import torch

from surogate.kernels import qk_norm_rope_backward, qk_norm_rope_forward, rope_inv_freq
from surogate.kernels.ops import qk_norm_rope
from surogate.kernels.testing import assert_close, randn
from surogate.kernels.torch import QKNormRoPE, QKNormRoPEFunction

EPS = 1e-6
# (n_q, n_kv, head_dim): Qwen3 0.6B/1.7B, 4B/8B, 14B/32B, a head_dim of 64
GPU_HEADS = [(16, 8, 128), (32, 8, 128), (40, 8, 128), (16, 8, 64)]


def float64_truth(qkv, q_weight, k_weight, position_ids, inv_freq, n_q, n_kv, head_dim, dy):
    """Output, rstd and every gradient by float64 autograd of the unfused formula: Qwen3's per-head RMSNorm, then
    HF's x * cos + rotate_half(x) * sin (angle in fp32, as HF forms it)."""
    tokens = qkv.shape[0]
    x = qkv.double().view(tokens, n_q + 2 * n_kv, head_dim).requires_grad_()
    qw = q_weight.double().requires_grad_()
    kw = k_weight.double().requires_grad_()
    angle = (position_ids.reshape(-1, 1).float() * inv_freq.reshape(1, -1)).double()
    emb = torch.cat([angle, angle], dim=-1).unsqueeze(1)

    def norm_rope(t, w):
        y = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * w
        rotate_half = torch.cat([-y[..., head_dim // 2 :], y[..., : head_dim // 2]], dim=-1)
        return y * emb.cos() + rotate_half * emb.sin()

    q, k, v = x[:, :n_q], x[:, n_q : n_q + n_kv], x[:, n_q + n_kv :]
    out = torch.cat([norm_rope(q, qw), norm_rope(k, kw), v], dim=1).reshape(tokens, -1)
    out.backward(dy.double())
    qk = x.detach()[:, : n_q + n_kv]
    rstd = torch.rsqrt(qk.pow(2).mean(-1) + EPS)
    return out.detach(), rstd, x.grad.reshape(tokens, -1), qw.grad, kw.grad


def inputs(tokens, n_q, n_kv, head_dim, dtype, generator, theta=1e6, max_position=32768):
    width = (n_q + 2 * n_kv) * head_dim
    qkv = randn(tokens, width, dtype=dtype, generator=generator, scale=2.0)
    q_weight = (1 + 0.2 * randn(head_dim, generator=generator)).to(dtype)
    k_weight = (1 + 0.2 * randn(head_dim, generator=generator)).to(dtype)
    pos = torch.randint(0, max_position, (tokens,), generator=generator)
    dy = randn(tokens, width, dtype=dtype, generator=generator)
    return qkv, q_weight, k_weight, pos, rope_inv_freq(head_dim, theta), dy


def _misaligned_copy(t, device):
    """A copy 2 (bf16) or 4 (fp32) bytes into its storage: it cannot be read as 8-byte words."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape).copy_(t)


def check(forward, backward, tokens, n_q, n_kv, head_dim, dtype, generator, device="cpu", pos_dtype=torch.int64,
          max_position=32768, misaligned=False):
    qkv, qw, kw, pos, inv_freq, dy = inputs(tokens, n_q, n_kv, head_dim, dtype, generator, max_position=max_position)
    out64, rstd64, d64, dqw64, dkw64 = float64_truth(qkv, qw, kw, pos, inv_freq, n_q, n_kv, head_dim, dy)
    buf = _misaligned_copy(qkv, device) if misaligned else qkv.to(device)
    saved = buf.clone()  # the forward overwrites its input; the backward needs it
    args = (pos.to(pos_dtype).to(device), inv_freq.to(device), n_q, n_kv, head_dim)
    out, rstd = forward(buf, qw.to(device), kw.to(device), *args, EPS)
    assert out is buf, "the forward works in place"
    grad = _misaligned_copy(dy, device) if misaligned else dy.to(device)
    d_qkv, dqw, dkw = backward(grad, saved, qw.to(device), kw.to(device), rstd, *args)
    v = slice((n_q + n_kv) * head_dim, None)
    assert torch.equal(out[:, v].cpu(), qkv[:, v]), "v is untouched"
    assert torch.equal(d_qkv[:, v].cpu(), dy[:, v]), "v's gradient passes through"
    assert rstd.dtype == torch.float32 and rstd.shape == (tokens, n_q + n_kv)
    assert dqw.dtype == dtype and dkw.dtype == dtype and d_qkv.dtype == dtype
    assert_close(out, out64, dtype, "qkv out")
    assert_close(rstd, rstd64, torch.float32, "rstd")
    assert_close(d_qkv, d64, dtype, "d_qkv")
    # dq/dk_weight sum tokens x heads products: fp32 accumulation error grows ~sqrt(terms) ulps; 2x covers 4096 x 40.
    assert_close(dqw, dqw64, dtype, "dq_weight", factor=2.0)
    assert_close(dkw, dkw64, dtype, "dk_weight", factor=2.0)


@pytest.mark.parametrize(
    "tokens,n_q,n_kv,head_dim", [(1, 1, 1, 2), (7, 3, 1, 10), (33, 4, 2, 64), (64, 16, 8, 128), (5, 2, 1, 80)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(tokens, n_q, n_kv, head_dim, dtype, generator):
    check(qk_norm_rope.reference_forward, qk_norm_rope.reference_backward, tokens, n_q, n_kv, head_dim, dtype,
          generator)


def test_public_functions_on_cpu(generator):
    qkv, qw, kw, pos, inv_freq, dy = inputs(5, 2, 1, 8, torch.float32, generator)
    saved = qkv.clone()
    out64, rstd64, d64, dqw64, dkw64 = float64_truth(qkv, qw, kw, pos, inv_freq, 2, 1, 8, dy)
    out, rstd = qk_norm_rope_forward(qkv, qw, kw, pos.to(torch.int32), inv_freq, 2, 1, 8, EPS)
    d, dqw, dkw = qk_norm_rope_backward(dy.clone(), saved, qw, kw, rstd, pos, inv_freq, 2, 1, 8)
    assert_close(out, out64, torch.float32, "out")
    assert_close(d, d64, torch.float32, "d_qkv")
    assert_close(dkw, dkw64, torch.float32, "dk_weight")


def test_bad_arguments_raise(generator):
    qkv, qw, kw, pos, inv_freq, _ = inputs(3, 2, 1, 8, torch.float32, generator)
    with pytest.raises(ValueError, match="q_weight must be"):
        qk_norm_rope_forward(qkv, qw[:4], kw, pos, inv_freq, 2, 1, 8, EPS)
    with pytest.raises(ValueError, match="k_weight must be"):
        qk_norm_rope_forward(qkv, qw, kw.bfloat16(), pos, inv_freq, 2, 1, 8, EPS)
    with pytest.raises(ValueError, match=r"\[tokens, 48\]"):
        qk_norm_rope_forward(qkv, qw, kw, pos, inv_freq, 2, 2, 8, EPS)


def test_matches_transformers_qwen3(generator):
    """Against transformers' own Qwen3 pieces (Qwen3RMSNorm as q_norm / k_norm, Qwen3RotaryEmbedding,
    apply_rotary_pos_emb), in fp32."""
    transformers = pytest.importorskip("transformers")
    check_against_transformers(transformers, qk_norm_rope.reference_forward, generator)


def check_against_transformers(transformers, forward, generator, device="cpu", tokens=40, n_q=4, n_kv=2, head_dim=64):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

    qkv, qw, kw, pos, _, _ = inputs(tokens, n_q, n_kv, head_dim, torch.float32, generator)
    config = transformers.Qwen3Config(hidden_size=n_q * head_dim, num_attention_heads=n_q, num_key_value_heads=n_kv,
                                      head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                      rms_norm_eps=EPS, max_position_embeddings=40960)
    q_norm, k_norm = Qwen3RMSNorm(head_dim, eps=EPS), Qwen3RMSNorm(head_dim, eps=EPS)
    with torch.no_grad():
        q_norm.weight.copy_(qw)
        k_norm.weight.copy_(kw)
    rotary = Qwen3RotaryEmbedding(config)
    heads = qkv.view(tokens, n_q + 2 * n_kv, head_dim)
    with torch.no_grad():
        q = q_norm(heads[:, :n_q]).transpose(0, 1)[None]  # HF layout [batch, heads, seq, head_dim]
        k = k_norm(heads[:, n_q : n_q + n_kv]).transpose(0, 1)[None]
        cos, sin = rotary(q, pos.view(1, -1))
        q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    out, _ = forward(qkv.to(device), qw.to(device), kw.to(device), pos.to(device), rotary.inv_freq.to(device), n_q,
                     n_kv, head_dim, EPS)
    out = out.cpu().view(tokens, -1, head_dim)
    assert_close(out[:, :n_q], q_hf[0].transpose(0, 1), torch.float32, "q vs transformers")
    assert_close(out[:, n_q : n_q + n_kv], k_hf[0].transpose(0, 1), torch.float32, "k vs transformers")


def test_module_matches_float64_autograd(generator):
    n_q, n_kv, head_dim = 3, 1, 16
    qkv, qw, kw, pos, _, dy = inputs(6, n_q, n_kv, head_dim, torch.float32, generator)
    module = QKNormRoPE(n_q, n_kv, head_dim, eps=EPS, theta=1e6)
    with torch.no_grad():
        module.q_weight.copy_(qw)
        module.k_weight.copy_(kw)
    x = qkv.clone().requires_grad_()
    out = module(x, pos)
    out.backward(dy)
    assert torch.equal(x.detach(), qkv), "the module is out of place"
    out64, _, d64, dqw64, dkw64 = float64_truth(qkv, qw, kw, pos, module.inv_freq, n_q, n_kv, head_dim, dy)
    assert_close(out, out64, torch.float32, "out")
    assert_close(x.grad, d64, torch.float32, "d_qkv")
    assert_close(module.q_weight.grad, dqw64, torch.float32, "dq_weight")
    assert_close(module.k_weight.grad, dkw64, torch.float32, "dk_weight")
    assert QKNormRoPEFunction.apply(qkv, qw, kw, pos, module.inv_freq, n_q, n_kv, head_dim, EPS).shape == qkv.shape


@pytest.mark.sim
@pytest.mark.parametrize(
    "tokens,n_q,n_kv,head_dim,dtype,misaligned",
    [
        (3, 2, 1, 16, torch.float32, False),  # words of 2 fp32, 4 lanes a head
        (3, 2, 1, 16, torch.bfloat16, False),  # words of 4 bf16, 2 lanes a head
        (2, 3, 1, 16, torch.bfloat16, True),  # misaligned: one value per load
        (2, 6, 3, 70, torch.float32, False),  # d/2 = 35 odd: 32 lanes a head, 2 values a lane, 5 warps (2 heads a step)
    ],
)
def test_kernel_in_simulator(tokens, n_q, n_kv, head_dim, dtype, misaligned, generator):
    check(qk_norm_rope.forward, qk_norm_rope.backward, tokens, n_q, n_kv, head_dim, dtype, generator,
          max_position=1 << 20, misaligned=misaligned)


@pytest.mark.gpu
@pytest.mark.parametrize("n_q,n_kv,head_dim", GPU_HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(n_q, n_kv, head_dim, dtype, generator):
    check(qk_norm_rope.forward, qk_norm_rope.backward, 4096, n_q, n_kv, head_dim, dtype, generator, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,misaligned", [(80, False), (128, True), (256, False), (6, False)])
def test_kernel_on_gpu_odd_shapes_int32_positions(head_dim, misaligned, generator):
    check(qk_norm_rope.forward, qk_norm_rope.backward, 1000, 5, 3, head_dim, torch.bfloat16, generator,
          device="cuda", pos_dtype=torch.int32, misaligned=misaligned)


@pytest.mark.gpu
def test_kernel_on_gpu_matches_transformers(generator):
    transformers = pytest.importorskip("transformers")
    check_against_transformers(transformers, qk_norm_rope.forward, generator, device="cuda", tokens=4096, n_q=16,
                               n_kv=8, head_dim=128)


@pytest.mark.gpu
def test_module_on_gpu(generator):
    n_q, n_kv, head_dim = 16, 8, 128
    qkv, qw, kw, pos, _, dy = inputs(2048, n_q, n_kv, head_dim, torch.bfloat16, generator)
    module = QKNormRoPE(n_q, n_kv, head_dim, eps=EPS, theta=1e6, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        module.q_weight.copy_(qw)
        module.k_weight.copy_(kw)
    x = qkv.cuda().requires_grad_()
    module(x, pos.cuda()).backward(dy.cuda())
    out64, _, d64, dqw64, dkw64 = float64_truth(qkv, qw, kw, pos, module.inv_freq.cpu(), n_q, n_kv, head_dim, dy)
    assert_close(x.grad, d64, torch.bfloat16, "d_qkv")
    assert_close(module.q_weight.grad, dqw64, torch.bfloat16, "dq_weight", factor=2.0)
    assert_close(module.k_weight.grad, dkw64, torch.bfloat16, "dk_weight", factor=2.0)
