"""recompute_block: a whole transformer layer (attention half + MLP half) as one autograd Function that keeps
only the layer's input residual h (and LoRA dropout masks); backward reruns both halves' forward from h with
everything kept (except the MLP's down projection, whose output backward never reads), then runs the MLP backward
and the attention backward (the same functions the halves use).

The rerun attention half starts from h with a plain RMSNorm, where forward fused the residual add into it:
h is the same tensor and the norm is the same math, so the numbers do not change.
offload_residual (bc.offload, see _offload.py): the kept tensors go to host memory in forward instead of
save_for_backward and come back (prefetched two layers ahead) in backward: bit for bit the same tensors.
"""

from __future__ import annotations

import torch

from . import attention, mlp
from ._context import BlockContext
from ._saving import pack, unpack

_N_ATT = len(attention.SLOTS)
SLOTS = tuple(f"att.{s}" for s in attention.SLOTS) + tuple(f"mlp.{s}" for s in mlp.SLOTS)


def _split(weights: dict, gemms: dict | None) -> tuple[dict, dict]:
    wa = attention.with_gemms({s: weights[f"att.{s}"] for s in attention.SLOTS}, gemms)
    wm = mlp.with_gemms({s: weights[f"mlp.{s}"] for s in mlp.SLOTS}, gemms)
    return wa, wm


def _masks(acts: dict) -> dict:
    return {k: v for k, v in acts.items() if k.startswith("mask_")}


class RecomputedBlock(torch.autograd.Function):
    """apply(residual, delta | None, bc, gemms | None, *attention tensors, *mlp tensors) -> (h2, z); gemms: the
    layer's {"qkv", "o", "gate_up", "down"} -> Gemm | None (None: plain torch GEMMs)."""

    @staticmethod
    def forward(ctx, residual, delta, bc: BlockContext, gemms, *tensors):
        wa, wm = _split(dict(zip(SLOTS, tensors, strict=True)), gemms)
        h, y, acts_a = attention.forward(residual, delta, wa, bc, keep_pre=False)
        h2, z, acts_m = mlp.forward(h, y, wm, bc)
        saved = {"h": h}
        saved.update({f"att.{k}": v for k, v in _masks(acts_a).items()})
        saved.update({f"mlp.{k}": v for k, v in _masks(acts_m).items()})
        ctx.ticket = None if bc.offload is None else bc.offload.save(saved)  # offload_residual: host copies
        pack(ctx, saved if ctx.ticket is None else {}, tensors)
        ctx.bc, ctx.gemms = bc, gemms
        return h2, z

    @staticmethod
    def backward(ctx, dh2, dz):
        dh2, dz = dh2.contiguous(), dz.contiguous()  # the kernels read rows of contiguous tensors
        saved, weights = unpack(ctx, SLOTS)
        bc = ctx.bc
        if ctx.ticket is not None:
            saved = bc.offload.load(ctx.ticket)
        wa, wm = _split(weights, ctx.gemms)
        masks_a = {k[4:]: v for k, v in saved.items() if k.startswith("att.")}
        masks_m = {k[4:]: v for k, v in saved.items() if k.startswith("mlp.")}
        with torch.no_grad():
            h, y, acts_a = attention.forward(saved["h"], None, wa, bc, keep_pre=True, masks=masks_a)
            acts_m = mlp.backward_inputs(h, y, wm, bc, masks_m)  # no down projection: backward does not read z
        del y
        needs = ctx.needs_input_grad
        need = dict(zip(SLOTS, needs[4:], strict=True))
        d_mid, gm = mlp.backward(acts_m, dh2, dz, wm, bc, True, {s: need[f"mlp.{s}"] for s in mlp.SLOTS})
        del acts_m
        dh, ga = attention.backward(acts_a, d_mid, d_mid, wa, bc, needs[0] or needs[1],
                                    {s: need[f"att.{s}"] for s in attention.SLOTS})
        grads = [ga[s] for s in attention.SLOTS] + [gm[s] for s in mlp.SLOTS]
        return (dh if needs[0] else None, dh if needs[1] else None, None, None, *grads)
