"""The attention half of a transformer block, as an autograd Function with a hand-written backward.

    h = residual + delta (or residual alone in layer 0);  ln1 = RMSNorm(h)         fused_add_rms_norm / rms_norm
    qkv = ln1 Wqkv^T (+ bias) (+ LoRA on the q / k / v row slices)                 torch GEMM, fused [q; k; v] rows
    q, k = RoPE(q, k), or RoPE(RMSNorm_head(q), RMSNorm_head(k)) for Qwen3         rope / qk_norm_rope (in place)
    att = causal attention inside each packed document (GQA)                      FlashAttention varlen / reference
    y = att Wo^T (+ bias) (+ LoRA)                                                  torch GEMM
Outputs (h, y); the next half adds them (the residual add fuses into its RMSNorm). Backward takes (dh, dy) and
returns one gradient for residual and delta (both receive dh_total = dh + RMSNorm backward).
What is kept for backward follows the recompute flags (see _recompute.py); missing activations are rebuilt by
the same stage functions in backward, so recompute never changes the numbers. Frozen weights (requires_grad
False) get no gradient GEMM; the input gradient is skipped when nothing upstream needs it (LoRA, layer 0).
Numerics: activations and GEMMs in the model dtype, norms/RoPE/softmax in fp32 inside the kernels. The qkv and o
GEMMs run through the layer's Gemm (a quantised recipe or a QLoRA base weight, see _gemm.py) when it has one.
"""

from __future__ import annotations

import torch

from .. import _ops
from ._context import BlockContext
from ._projection import Lora, dropout_mask, lora_inputs, projection_backward, projection_forward
from ._saving import pack, unpack

SLOTS = ("ln", "qkv", "qkv_bias", "q_norm", "k_norm", "o", "o_bias",
         "q_A", "q_B", "k_A", "k_B", "v_A", "v_B", "o_A", "o_B")  # fmt: skip
GEMMS = ("qkv", "o")


def with_gemms(w: dict, gemms: dict | None) -> dict:
    """Adds w["qkv_gemm"], w["o_gemm"]: the layer's Gemm objects, or None (plain torch GEMMs)."""
    for g in GEMMS:
        w[f"{g}_gemm"] = gemms.get(g) if gemms else None
    return w


def _qkv_loras(w: dict, bc: BlockContext, acts: dict) -> list[Lora]:
    c = bc.config
    rows = {"q": slice(0, c.q_size), "k": slice(c.q_size, c.q_size + c.kv_size),
            "v": slice(c.q_size + c.kv_size, c.qkv_size)}  # fmt: skip
    return [Lora(rows[m], w[f"{m}_A"], w[f"{m}_B"], acts.get(f"mask_{m}")) for m in "qkv" if w[f"{m}_A"] is not None]


def _o_loras(w: dict, bc: BlockContext, acts: dict) -> list[Lora]:
    if w["o_A"] is None:
        return []
    return [Lora(slice(0, bc.config.hidden_size), w["o_A"], w["o_B"], acts.get("mask_o"))]


def _heads(qkv: torch.Tensor, bc: BlockContext):
    """[tokens, qkv_size] -> q [tokens, n_q, d], k, v [tokens, n_kv, d] (views)."""
    c = bc.config
    t = qkv.view(qkv.shape[0], -1, c.head_dim)
    return t[:, : c.num_heads], t[:, c.num_heads : c.num_heads + c.num_kv_heads], t[:, c.num_heads + c.num_kv_heads :]


# ------------------------------------------------------------------------------------------ stages
def _stage_norm(acts, w, bc):
    acts["ln"], acts["rstd"] = _ops.rms_norm_forward(acts["h"], w["ln"], bc.config.rms_norm_eps)


def _stage_qkv(acts, w, bc, keep_pre: bool):
    c = bc.config
    qkv, us = projection_forward(acts["ln"], w["qkv"], w["qkv_bias"], _qkv_loras(w, bc, acts), bc.lora_scale,
                                 bc.dropout, w["qkv_gemm"])
    acts["u_qkv"] = us
    pos = bc.docs.position_ids
    if c.qk_norm:
        if keep_pre:
            acts["qkv_pre"] = qkv.clone()
        qkv, acts["qk_rstd"] = _ops.qk_norm_rope_forward(qkv, w["q_norm"], w["k_norm"], pos, bc.inv_freq,
                                                         c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps)
    else:
        qkv = _ops.rope_forward(qkv, pos, bc.inv_freq, c.num_heads, c.num_kv_heads, c.head_dim)
    acts["qkv"] = qkv


def _stage_attention(acts, bc):
    q, k, v = _heads(acts["qkv"], bc)
    out, acts["lse"], acts["att_extra"] = bc.attention.attention_forward(q, k, v, bc.docs, bc.softmax_scale)
    acts["att"] = out.reshape(out.shape[0], -1)


def _stage_out(acts, w, bc):
    y, us = projection_forward(acts["att"], w["o"], w["o_bias"], _o_loras(w, bc, acts), bc.lora_scale, bc.dropout,
                               w["o_gemm"])
    acts["u_o"] = us
    return y


def forward(residual, delta, w: dict, bc: BlockContext, keep_pre: bool = True, masks: dict | None = None):
    """-> (h, y, acts): acts holds every intermediate (the caller keeps what the recompute flags say)."""
    c = bc.config
    if delta is None:
        acts = {"h": residual}
        _stage_norm(acts, w, bc)
    else:
        ln, h, rstd = _ops.fused_add_rms_norm_forward(residual, delta, w["ln"], c.rms_norm_eps)
        acts = {"h": h, "ln": ln, "rstd": rstd}
    if masks is None:
        masks = {}
        for m in "qkv":
            if w[f"{m}_A"] is not None and bc.dropout > 0:
                masks[f"mask_{m}"] = dropout_mask(acts["ln"], bc.dropout)
    acts.update(masks)
    _stage_qkv(acts, w, bc, keep_pre and c.qk_norm)
    _stage_attention(acts, bc)
    if "mask_o" not in acts and w["o_A"] is not None and bc.dropout > 0:
        acts["mask_o"] = dropout_mask(acts["att"], bc.dropout)
    y = _stage_out(acts, w, bc)
    return acts["h"], y, acts


def kept(acts: dict, bc: BlockContext) -> dict:
    """The activations the recompute flags keep: h, the dropout masks, and per flag ln / qkv / attention."""
    rc = bc.recompute
    keep = {"h", "mask_q", "mask_k", "mask_v", "mask_o"}
    if rc.keep_ln1:
        keep |= {"ln", "rstd"}
    if rc.keep_qkv:
        keep |= {"qkv", "qkv_pre", "qk_rstd", "u_qkv"}
    if rc.keep_attention:
        keep |= {"att", "lse", "att_extra", "u_o"}
    return {k: v for k, v in acts.items() if k in keep}


def rebuild(acts: dict, w: dict, bc: BlockContext) -> dict:
    """Recompute (in place in `acts`) whatever backward needs and forward did not keep."""
    if "ln" not in acts:
        _stage_norm(acts, w, bc)
    if "qkv" not in acts:
        _stage_qkv(acts, w, bc, keep_pre=True)
    if "att" not in acts:
        _stage_attention(acts, bc)
    if "u_o" not in acts:
        acts["u_o"] = lora_inputs(acts["att"], _o_loras(w, bc, acts), bc.dropout)
    return acts


def backward(acts: dict, dh, dy, w: dict, bc: BlockContext, need_dx: bool, need: dict):
    """-> (dh_total | None, {slot: grad}) for the slots with need[slot]."""
    c = bc.config
    g = {}
    loras_o = _o_loras(w, bc, acts)
    d_att, g["o"], g["o_bias"], lora_o = projection_backward(
        dy, acts["att"], w["o"], loras_o, acts["u_o"], bc.lora_scale, bc.dropout, True, need["o"], need["o_bias"],
        [(need["o_A"], need["o_B"])] * len(loras_o), w["o_gemm"],
    )
    if lora_o:
        g["o_A"], g["o_B"] = lora_o[0]
    q, k, v = _heads(acts["qkv"], bc)
    out = acts["att"].view(-1, c.num_heads, c.head_dim)
    dq, dk, dv = bc.attention.attention_backward(d_att.view_as(out), q, k, v, out, acts["lse"], acts["att_extra"],
                                                 bc.docs, bc.softmax_scale)
    # one copy of each into d_qkv; cuDNN hands back [batch, seq, heads, d] strided views, FlashAttention [tokens,
    # heads, d]: reshape to [batch, seq, heads, d] is a view of either
    docs = bc.docs
    d_qkv = torch.empty(docs.tokens, c.qkv_size, dtype=dy.dtype, device=dy.device)
    parts = d_qkv.view(docs.batch, docs.seq, -1, c.head_dim)
    heads = (0, c.num_heads, c.num_heads + c.num_kv_heads, c.num_heads + 2 * c.num_kv_heads)
    for i, grad in enumerate((dq, dk, dv)):
        parts[:, :, heads[i] : heads[i + 1]].copy_(grad.reshape(docs.batch, docs.seq, -1, c.head_dim))
    pos = bc.docs.position_ids
    if c.qk_norm:
        d_qkv, g["q_norm"], g["k_norm"] = _ops.qk_norm_rope_backward(
            d_qkv, acts["qkv_pre"], w["q_norm"], w["k_norm"], acts["qk_rstd"], pos, bc.inv_freq, c.num_heads,
            c.num_kv_heads, c.head_dim,
        )
    else:
        d_qkv = _ops.rope_backward(d_qkv, pos, bc.inv_freq, c.num_heads, c.num_kv_heads, c.head_dim)
    loras = _qkv_loras(w, bc, acts)
    need_ln = need_dx or need["ln"]
    d_ln, g["qkv"], g["qkv_bias"], lora_qkv = projection_backward(
        d_qkv, acts["ln"], w["qkv"], loras, acts["u_qkv"], bc.lora_scale, bc.dropout, need_ln, need["qkv"],
        need["qkv_bias"], [(need[f"{m}_A"], need[f"{m}_B"]) for m in "qkv" if w[f"{m}_A"] is not None],
        w["qkv_gemm"],
    )
    for m, grads in zip([m for m in "qkv" if w[f"{m}_A"] is not None], lora_qkv, strict=True):
        g[f"{m}_A"], g[f"{m}_B"] = grads
    dh_total = None
    if need_ln:
        dh_total, g["ln"] = _ops.fused_add_rms_norm_backward(d_ln, dh, acts["h"], w["ln"], acts["rstd"])
    return dh_total, {s: g.get(s) if need[s] else None for s in SLOTS}


class AttentionHalf(torch.autograd.Function):
    """apply(residual, delta | None, bc, gemms | None, *tensors in SLOTS order) -> (h, y); gemms: the layer's
    {"qkv": Gemm | None, "o": Gemm | None} (None: plain torch GEMMs)."""

    @staticmethod
    def forward(ctx, residual, delta, bc: BlockContext, gemms, *tensors):
        w = with_gemms(dict(zip(SLOTS, tensors, strict=True)), gemms)
        h, y, acts = forward(residual, delta, w, bc, keep_pre=bc.recompute.keep_qkv)
        pack(ctx, kept(acts, bc), tensors)
        ctx.bc, ctx.gemms = bc, gemms
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        dh, dy = dh.contiguous(), dy.contiguous()  # the kernels read rows of contiguous tensors
        acts, w = unpack(ctx, SLOTS)
        with_gemms(w, ctx.gemms)
        rebuild(acts, w, ctx.bc)
        needs = ctx.needs_input_grad
        need = dict(zip(SLOTS, needs[4:], strict=True))
        dh_total, g = backward(acts, dh, dy, w, ctx.bc, needs[0] or needs[1], need)
        return (dh_total if needs[0] else None, dh_total if needs[1] else None, None, None, *[g[s] for s in SLOTS])

