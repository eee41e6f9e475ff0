"""The MLP half of a transformer block, as an autograd Function with a hand-written backward.

    h = residual + delta;  ln2 = RMSNorm(h)                                 fused_add_rms_norm
    gate_up = ln2 Wgu^T (+ LoRA on the gate / up row slices)               torch GEMM, fused [gate; up] rows
    act = silu(gate) * up                                                   swiglu
    z = act Wdown^T (+ LoRA)                                                torch GEMM
Outputs (h, z); backward takes (dh, dz) and returns dh_total for residual and delta. Kept for backward per the
recompute flags: h and rstd always, ln2 unless rmsnorm/ffn, gate_up unless ffn, act unless swiglu; the rest is
rebuilt by the same stage functions. Numerics as in attention.py (gate_up and down through the layer's Gemm when
it has one).
"""

from __future__ import annotations

import torch

from .. import _ops
from ._context import BlockContext
from ._projection import Lora, dropout_mask, lora_inputs, projection_backward, projection_forward
from ._saving import pack, unpack

SLOTS = ("ln", "gate_up", "down", "gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B")
GEMMS = ("gate_up", "down")


def with_gemms(w: dict, gemms: dict | None) -> dict:
    """Adds w["gate_up_gemm"], w["down_gemm"]: the layer's Gemm objects, or None (plain torch GEMMs)."""
    for g in GEMMS:
        w[f"{g}_gemm"] = gemms.get(g) if gemms else None
    return w


def _gate_up_loras(w: dict, bc: BlockContext, acts: dict) -> list[Lora]:
    i = bc.config.intermediate_size
    rows = {"gate": slice(0, i), "up": slice(i, 2 * i)}
    return [Lora(rows[m], w[f"{m}_A"], w[f"{m}_B"], acts.get(f"mask_{m}")) for m in ("gate", "up")
            if w[f"{m}_A"] is not None]  # fmt: skip


def _down_loras(w: dict, bc: BlockContext, acts: dict) -> list[Lora]:
    if w["down_A"] is None:
        return []
    return [Lora(slice(0, bc.config.hidden_size), w["down_A"], w["down_B"], acts.get("mask_down"))]


def _stage_gate_up(acts, w, bc):
    acts["gate_up"], acts["u_gate_up"] = projection_forward(acts["ln"], w["gate_up"], None,
                                                            _gate_up_loras(w, bc, acts), bc.lora_scale, bc.dropout,
                                                            w["gate_up_gemm"])


def _stage_swiglu(acts, w, bc):
    acts["act"] = _ops.swiglu_forward(acts["gate_up"])


def forward(residual, delta, w: dict, bc: BlockContext, masks: dict | None = None):
    """-> (h, z, acts)."""
    ln, h, rstd = _ops.fused_add_rms_norm_forward(residual, delta, w["ln"], bc.config.rms_norm_eps)
    acts = {"h": h, "ln": ln, "rstd": rstd}
    if masks is None:
        masks = {}
        for m in ("gate", "up"):
            if w[f"{m}_A"] is not None and bc.dropout > 0:
                masks[f"mask_{m}"] = dropout_mask(ln, bc.dropout)
    acts.update(masks)
    _stage_gate_up(acts, w, bc)
    _stage_swiglu(acts, w, bc)
    if "mask_down" not in acts and w["down_A"] is not None and bc.dropout > 0:
        acts["mask_down"] = dropout_mask(acts["act"], bc.dropout)
    z, acts["u_down"] = projection_forward(acts["act"], w["down"], None, _down_loras(w, bc, acts), bc.lora_scale,
                                           bc.dropout, w["down_gemm"])
    return h, z, acts


def kept(acts: dict, bc: BlockContext) -> dict:
    rc = bc.recompute
    keep = {"h", "rstd", "mask_gate", "mask_up", "mask_down"}
    if rc.keep_ln2:
        keep.add("ln")
    if rc.keep_gate_up:
        keep |= {"gate_up", "u_gate_up"}
    if rc.keep_swiglu:
        keep |= {"act", "u_down"}
    return {k: v for k, v in acts.items() if k in keep}


def rebuild(acts: dict, w: dict, bc: BlockContext) -> dict:
    if "ln" not in acts:
        acts["ln"], _ = _ops.rms_norm_forward(acts["h"], w["ln"], bc.config.rms_norm_eps)
    if "gate_up" not in acts:
        _stage_gate_up(acts, w, bc)
    if "act" not in acts:
        _stage_swiglu(acts, w, bc)
        acts["u_down"] = lora_inputs(acts["act"], _down_loras(w, bc, acts), bc.dropout)
    return acts


def backward_inputs(residual, delta, w: dict, bc: BlockContext, masks: dict) -> dict:
    """What backward reads, rebuilt from the half's inputs and saved dropout masks (recompute_block): forward's
    stages without the down projection, whose output z backward never reads (a third of the MLP's GEMM work)."""
    ln, h, rstd = _ops.fused_add_rms_norm_forward(residual, delta, w["ln"], bc.config.rms_norm_eps)
    return rebuild({"h": h, "ln": ln, "rstd": rstd, **masks}, w, bc)


def backward(acts: dict, dh, dz, w: dict, bc: BlockContext, need_dx: bool, need: dict):
    """-> (dh_total | None, {slot: grad})."""
    g = {}
    loras_down = _down_loras(w, bc, acts)
    d_act, g["down"], _, lora_down = projection_backward(
        dz, acts["act"], w["down"], loras_down, acts["u_down"], bc.lora_scale, bc.dropout, True, need["down"],
        False, [(need["down_A"], need["down_B"])] * len(loras_down), w["down_gemm"],
    )
    if lora_down:
        g["down_A"], g["down_B"] = lora_down[0]
    d_gate_up = _ops.swiglu_backward(d_act, acts["gate_up"])
    adapted = [m for m in ("gate", "up") if w[f"{m}_A"] is not None]
    need_ln = need_dx or need["ln"]
    d_ln, g["gate_up"], _, lora_gu = projection_backward(
        d_gate_up, acts["ln"], w["gate_up"], _gate_up_loras(w, bc, acts), acts["u_gate_up"], bc.lora_scale,
        bc.dropout, need_ln, need["gate_up"], False, [(need[f"{m}_A"], need[f"{m}_B"]) for m in adapted],
        w["gate_up_gemm"],
    )
    for m, grads in zip(adapted, lora_gu, strict=True):
        g[f"{m}_A"], g[f"{m}_B"] = grads
    dh_total = None
    if need_ln:
        dh_total, g["ln"] = _ops.fused_add_rms_norm_backward(d_ln, dh, acts["h"], w["ln"], acts["rstd"])
    return dh_total, {s: g.get(s) if need[s] else None for s in SLOTS}


class MlpHalf(torch.autograd.Function):
    """apply(residual, delta, bc, gemms | None, *tensors in SLOTS order) -> (h, z); gemms: the layer's
    {"gate_up": Gemm | None, "down": Gemm | None} (None: plain torch GEMMs)."""

    @staticmethod
    def forward(ctx, residual, delta, bc: BlockContext, gemms, *tensors):
        w = with_gemms(dict(zip(SLOTS, tensors, strict=True)), gemms)
        h, z, acts = forward(residual, delta, w, bc)
        pack(ctx, kept(acts, bc), tensors)
        ctx.bc, ctx.gemms = bc, gemms
        return h, z

    @staticmethod
    def backward(ctx, dh, dz):
        dh, dz = dh.contiguous(), dz.contiguous()  # the kernels read rows of contiguous tensors
        acts, w = unpack(ctx, SLOTS)
        with_gemms(w, ctx.gemms)
        rebuild(acts, w, ctx.bc)
        needs = ctx.needs_input_grad
        dh_total, g = backward(acts, dh, dz, w, ctx.bc, needs[0] or needs[1], dict(zip(SLOTS, needs[4:], strict=True)))
        return (dh_total if needs[0] else None, dh_total if needs[1] else None, None, None, *[g[s] for s in SLOTS])

