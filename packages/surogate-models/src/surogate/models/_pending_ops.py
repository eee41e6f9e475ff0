"""TEMPORARY torch reference math for surogate.kernels ops that have not landed yet.

TODO(issue 4 / kernels issue): every function here follows the op contract in /tmp/contracts.md exactly
(names, arguments, in-place behaviour, return values). `_ops.py` takes the op from surogate.kernels as soon as
it exists there and falls back to this module only until then; delete this file when all ops have landed.

Numerics: fp32 compute for bf16/fp32 inputs, results rounded once to the input dtype.
"""

from __future__ import annotations

import math

import torch


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ------------------------------------------------------------------------------------- fused add + RMSNorm
def fused_add_rms_norm_forward(residual, x, w, eps):
    h = (_f32(residual) + _f32(x)).to(x.dtype)
    hf = _f32(h)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = (hf * rstd * _f32(w)).to(x.dtype)
    return y, h, rstd.reshape(-1).float()


def fused_add_rms_norm_backward(dy, dh, h, w, rstd):
    n = h.shape[-1]
    hf = _f32(h).reshape(-1, n)
    g = _f32(dy).reshape(-1, n)
    r = rstd.reshape(-1, 1).to(hf.dtype)
    wdy = g * _f32(w)
    dx = r * (wdy - hf * (r * r) * (wdy * hf).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + _f32(dh).reshape(-1, n)
    dw = (g * hf * r).sum(0)
    return dx.to(h.dtype).view(h.shape), dw.to(w.dtype)


# ------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim, theta, rope_scaling=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not rope_scaling:
        return inv_freq
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope_scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3)")
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_len = rope_scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _cos_sin(position_ids, inv_freq):
    angle = position_ids.reshape(-1, 1).float() * inv_freq.float().reshape(1, -1)  # [tokens, d/2]
    return angle.cos()[:, None, :], angle.sin()[:, None, :]


def _rotate(x, cos, sin, sign):
    """x [tokens, heads, d] in fp32: out1 = x1 cos - s x2 sin, out2 = x2 cos + s x1 sin (s = +1 fwd, -1 bwd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin], dim=-1)


def _rope_apply(qkv, position_ids, inv_freq, n_q, n_kv, head_dim, sign):
    heads = qkv.view(qkv.shape[0], -1, head_dim)
    rot = heads[:, : n_q + n_kv]
    cos, sin = _cos_sin(position_ids, inv_freq)
    rot.copy_(_rotate(_f32(rot), cos, sin, sign))
    return qkv


def rope_forward(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim):
    return _rope_apply(qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, 1.0)


def rope_backward(d_qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim):
    return _rope_apply(d_qkv, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, -1.0)


def _head_weights(q_weight, k_weight, n_q, n_kv):
    return torch.cat([_f32(q_weight).expand(n_q, -1), _f32(k_weight).expand(n_kv, -1)], dim=0)  # [heads, d]


def qk_norm_rope_forward(qkv, q_weight, k_weight, position_ids, inv_freq, n_q_heads, n_kv_heads, head_dim, eps):
    heads = qkv.view(qkv.shape[0], -1, head_dim)
    rot = heads[:, : n_q_heads + n_kv_heads]
    x = _f32(rot)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    normed = x * rstd * _head_weights(q_weight, k_weight, n_q_heads, n_kv_heads)
    cos, sin = _cos_sin(position_ids, inv_freq)
    rot.copy_(_rotate(normed, cos, sin, 1.0))
    return qkv, rstd.squeeze(-1).float()


def qk_norm_rope_backward(d_qkv, qkv_in, q_weight, k_weight, rstd, position_ids, inv_freq, n_q, n_kv, head_dim):
    tokens = d_qkv.shape[0]
    d_heads = d_qkv.view(tokens, -1, head_dim)
    x = _f32(qkv_in.view(tokens, -1, head_dim)[:, : n_q + n_kv])
    cos, sin = _cos_sin(position_ids, inv_freq)
    dn = _rotate(_f32(d_heads[:, : n_q + n_kv]), cos, sin, -1.0)
    w = _head_weights(q_weight, k_weight, n_q, n_kv)
    r = rstd.unsqueeze(-1).to(x.dtype)
    wdn = dn * w
    dx = r * (wdn - x * (r * r) * (wdn * x).mean(-1, keepdim=True))
    dw = (dn * x * r).sum(0)  # [heads, d]
    out = d_qkv.clone()
    out.view(tokens, -1, head_dim)[:, : n_q + n_kv] = dx.to(d_qkv.dtype)
    return out, dw[:n_q].sum(0).to(q_weight.dtype), dw[n_q:].sum(0).to(k_weight.dtype)


# ------------------------------------------------------------------------------------- SwiGLU, bias, embedding
def swiglu_forward(gate_up):
    g, u = _f32(gate_up).chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype)


def swiglu_backward(dh, gate_up):
    g, u = _f32(gate_up).chunk(2, dim=-1)
    d = _f32(dh)
    s = torch.sigmoid(g)
    dg = d * u * s * (1 + g * (1 - s))
    du = d * g * s
    return torch.cat([dg, du], dim=-1).to(gate_up.dtype)


def bias_grad(dy):
    return _f32(dy).reshape(-1, dy.shape[-1]).sum(0).to(dy.dtype)


def embedding_forward(ids, table):
    return table[ids.reshape(-1)]


def embedding_backward(dx, ids, num_embeddings):
    out = torch.zeros(num_embeddings, dx.shape[-1], dtype=torch.float32, device=dx.device)
    out.index_add_(0, ids.reshape(-1), _f32(dx).reshape(-1, dx.shape[-1]).float())
    return out.to(dx.dtype)


# ------------------------------------------------------------------------------------- fused linear + CE
def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, grad_scale=1.0, chunk_rows=None,
                               compute_weight_grad=False):
    rows = hidden.shape[0]
    chunk = chunk_rows or max(1, min(rows, 4096))
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if compute_weight_grad else None
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    n_valid = torch.zeros((), dtype=torch.int64, device=hidden.device)
    for start in range(0, rows, chunk):
        h = hidden[start : start + chunk]
        t = targets[start : start + chunk]
        logits = _f32(h @ weight.t())
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
        loss_sum += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
        n_valid += valid.sum()
        dlogits = torch.softmax(logits, dim=-1)
        dlogits[torch.arange(len(t), device=t.device), safe] -= 1.0
        dlogits *= valid.unsqueeze(1).to(dlogits.dtype) * grad_scale
        dl = dlogits.to(hidden.dtype)
        d_hidden[start : start + chunk] = dl @ weight
        if d_weight is not None:
            d_weight += _f32(dl.t() @ h).float()
    return loss_sum, n_valid, d_hidden, d_weight


def cross_entropy_loss(logits, targets, ignore_index=-100):
    x = _f32(logits)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    losses = torch.logsumexp(x, dim=-1) - x.gather(1, safe.unsqueeze(1)).squeeze(1)
    return torch.where(valid, losses, torch.zeros_like(losses)).sum().float(), valid.sum()
