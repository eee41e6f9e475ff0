"""The ends of the network as autograd Functions: token embedding, final RMSNorm, fused linear cross-entropy.

Embedding: x = table[ids]; backward (only for a trainable table) = surogate.kernels embedding_backward
(deterministic segment sums). FinalNorm: y = RMSNorm(residual + delta) with fused_add_rms_norm.
FusedLoss: surogate.kernels fused_linear_cross_entropy runs the lm_head GEMM in row chunks with the CE kernel,
so [tokens, vocab] fp32 logits never exist; it returns d_hidden (and d_weight in fp32 when the head is
trainable) already, which backward multiplies by the incoming gradient (a 0-d tensor: no host sync).
With mean=True the value is loss_sum / n_valid and the gradients are grad_scale * d(mean); else loss_sum and
d(loss_sum). n_valid (int64 0-d) counts targets != -100. Without gradients (eval), loss_without_grad runs the
lm_head GEMM in row chunks (<= 256 MiB of logits each) and the CE kernel's loss-only pass.
"""

from __future__ import annotations

import torch

from .. import _ops

IGNORE_INDEX = -100
_CHUNK_BYTES = 256 * 2**20


def loss_without_grad(hidden, weight, targets, mean: bool):
    """(loss, n_valid) as FusedLoss computes them, with no gradient work (eval / no_grad)."""
    rows = hidden.shape[0]
    chunk = max(1, min(rows, _CHUNK_BYTES // (weight.shape[0] * hidden.element_size())))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows, chunk):
        logits = torch.matmul(hidden[start : start + chunk], weight.t())
        total += _ops.cross_entropy_loss(logits, targets[start : start + chunk], IGNORE_INDEX)[0]
    n_valid = (targets != IGNORE_INDEX).sum()
    return (total / n_valid.clamp(min=1) if mean else total), n_valid


class Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, table):
        ctx.save_for_backward(ids)
        ctx.num_embeddings = table.shape[0]
        ctx.table_dtype = table.dtype
        return _ops.embedding_forward(ids, table)

    @staticmethod
    def backward(ctx, dx):
        if not ctx.needs_input_grad[1]:
            return None, None
        (ids,) = ctx.saved_tensors
        return None, _ops.embedding_backward(dx.contiguous(), ids, ctx.num_embeddings).to(ctx.table_dtype)


class FinalNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, delta, weight, eps: float):
        y, h, rstd = _ops.fused_add_rms_norm_forward(residual, delta, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        h, weight, rstd = ctx.saved_tensors
        dh, dw = _ops.fused_add_rms_norm_backward(dy.contiguous(), None, h, weight, rstd)
        needs = ctx.needs_input_grad
        return (dh if needs[0] else None, dh if needs[1] else None, dw if needs[2] else None, None)


class FusedLoss(torch.autograd.Function):
    """apply(hidden [rows, C], weight [V, C], targets [rows], mean: bool, grad_scale) -> (loss, n_valid)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, mean: bool, grad_scale):
        n_valid = (targets != IGNORE_INDEX).sum()
        scale = grad_scale / n_valid.clamp(min=1).to(torch.float32) if mean else grad_scale
        need_w = ctx.needs_input_grad[1]
        loss_sum, _, d_hidden, d_weight = _ops.fused_linear_cross_entropy(
            hidden, weight, targets, IGNORE_INDEX, scale, compute_weight_grad=need_w
        )
        # kept as attributes (not save_for_backward): backward scales d_weight in place and frees both at once
        ctx.grads = (d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(n_valid)
        loss = loss_sum / n_valid.clamp(min=1) if mean else loss_sum
        return loss, n_valid

    @staticmethod
    def backward(ctx, g, _g_n):
        if ctx.grads is None:
            raise RuntimeError("the fused loss computes its gradients once: backward twice is not supported")
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        needs = ctx.needs_input_grad
        dh = (d_hidden.float() * g).to(d_hidden.dtype) if needs[0] else None
        dw = d_weight.mul_(g).to(ctx.weight_dtype) if needs[1] and d_weight is not None else None
        return dh, dw, None, None, None
