"""Fused lm_head + cross-entropy: loss and gradients of CE(hidden @ weight.T, targets) without [rows, V] logits.

Rows go through in chunks. Per chunk: logits = hidden[chunk] @ weight.T (torch.mm in the input dtype: cuBLAS with
fp32 accumulation, rounded once to bf16 for bf16 inputs) into one reused chunk buffer; the cross-entropy kernel
turns the buffer into dlogits * grad_scale in place (ops/cross_entropy.py); d_hidden[chunk] = dlogits @ weight
(input dtype); with compute_weight_grad, d_weight += dlogits.T @ hidden[chunk] in fp32:
- fp32 inputs: an fp32 addmm into d_weight;
- bf16 inputs: bf16 x bf16 products accumulated by cuBLAS straight into the fp32 d_weight (beta = 1) through
  torch.addmm(..., out_dtype=torch.float32) on torch versions that accept an fp32 input there; on others,
  bf16 products of vocab slices (each <= CHUNK_BYTES) added into d_weight in fp32.
Never materialises [rows, V] logits, in fp32 or in the compute dtype. Peak extra memory: one chunk of logits in the
compute dtype (+ one vocab-slice buffer <= CHUNK_BYTES on the d_weight fallback path) + fp32 per-row losses.

Default chunk (CHUNK_BYTES = 256 MiB): the fewest equal chunks, rounded up to 8 rows, whose logits fit 256 MiB:
4096 rows x 151936 bf16 (1.16 GiB of logits) -> 5 chunks of 824 rows (239 MiB each). Larger chunks save nothing
measurable: the lm_head GEMMs are 1e12+ FLOPs per chunk at this size, far above the launch overheads.
loss_sum (fp32) and n_valid (int64) are 0-d device tensors; grad_scale a float or a 0-d device tensor (no host sync).
"""

from __future__ import annotations

import torch

from .._runtime import ceil_div, dispatch, round_up
from . import cross_entropy

CHUNK_BYTES = 256 * 2**20


def default_chunk_rows(rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk: the fewest equal chunks (rounded up to 8 rows when over 8) whose logits take <= CHUNK_BYTES."""
    n_chunks = max(1, ceil_div(rows * vocab * element_size, CHUNK_BYTES))
    chunk = max(1, ceil_div(rows, n_chunks))
    return min(rows, round_up(chunk, 8)) if chunk > 8 else chunk


_addmm_to_fp32: dict[str, bool] = {}  # device type -> does torch.addmm accept (fp32 C, bf16 A, B, out_dtype=fp32)?


def _accumulates_bf16_into_fp32(device: torch.device) -> bool:
    """Probe once per device type (the dtype check raises before any kernel runs)."""
    if device.type not in _addmm_to_fp32:
        c = torch.zeros(2, 2, dtype=torch.float32, device=device)
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        try:
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            _addmm_to_fp32[device.type] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _addmm_to_fp32[device.type] = False
    return _addmm_to_fp32[device.type]


def _accumulate_weight_grad(d_weight: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor):
    """d_weight [V, C] fp32 += dlogits.T @ hidden, summed in fp32."""
    if dlogits.dtype == torch.float32:
        d_weight.addmm_(dlogits.t(), hidden)
    elif _accumulates_bf16_into_fp32(d_weight.device):
        torch.addmm(d_weight, dlogits.t(), hidden, out_dtype=torch.float32, out=d_weight)
    else:
        vocab, n_cols = d_weight.shape
        slice_rows = max(1, min(vocab, CHUNK_BYTES // (n_cols * dlogits.element_size())))
        product = torch.empty(slice_rows, n_cols, dtype=dlogits.dtype, device=dlogits.device)
        for start in range(0, vocab, slice_rows):
            end = min(vocab, start + slice_rows)
            part = product[: end - start]
            torch.mm(dlogits[:, start:end].t(), hidden, out=part)
            d_weight[start:end].add_(part)


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    if hidden.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden and weight must both be float32 or both bfloat16, got {hidden.dtype} and {weight.dtype}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}] (lm_head), got {tuple(weight.shape)}")
    if targets.numel() != hidden.numel() // max(1, hidden.shape[-1]):
        raise ValueError(
            f"targets must hold one id per hidden row ({hidden.numel() // max(1, hidden.shape[-1])}), "
            f"got shape {tuple(targets.shape)}"
        )


def _fused(row_losses, sum_losses, hidden, weight, targets, ignore_index, grad_scale, chunk_rows,
           compute_weight_grad):
    _check(hidden, weight, targets)
    n_cols = hidden.shape[-1]
    h = hidden.detach().reshape(-1, n_cols).contiguous()
    w = weight.detach().contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    rows, vocab = h.shape[0], w.shape[0]
    chunk = chunk_rows or default_chunk_rows(rows, vocab, h.element_size())
    grad_scale = cross_entropy.scale_arg(grad_scale, h.device)
    losses = torch.empty(rows, dtype=torch.float32, device=h.device)
    d_hidden = torch.empty_like(h)
    d_weight = torch.zeros(vocab, n_cols, dtype=torch.float32, device=h.device) if compute_weight_grad else None
    logits_buffer = torch.empty(min(chunk, rows), vocab, dtype=h.dtype, device=h.device)
    for start in range(0, rows, chunk):
        end = min(rows, start + chunk)
        logits = logits_buffer[: end - start]
        torch.mm(h[start:end], w.t(), out=logits)
        row_losses(logits, t[start:end], ignore_index, grad_scale, losses[start:end], True)
        torch.mm(logits, w, out=d_hidden[start:end])
        if compute_weight_grad:
            _accumulate_weight_grad(d_weight, logits, h[start:end])
    loss_sum, n_valid = sum_losses(losses, t, ignore_index)
    return loss_sum, n_valid, d_hidden.view(hidden.shape), d_weight


# ---------------------------------------------------------------------------------------------------- launchers
def forward(hidden, weight, targets, ignore_index: int = -100, grad_scale=1.0, chunk_rows: int | None = None,
            compute_weight_grad: bool = False):
    """torch GEMMs + the Numba cross-entropy kernel. Returns (loss_sum, n_valid, d_hidden, d_weight fp32 or None)."""
    return _fused(cross_entropy.row_losses, cross_entropy.sum_losses, hidden, weight, targets, ignore_index,
                  grad_scale, chunk_rows, compute_weight_grad)


# ---------------------------------------------------------------------------------------------------- reference
def reference(hidden, weight, targets, ignore_index: int = -100, grad_scale=1.0, chunk_rows: int | None = None,
              compute_weight_grad: bool = False):
    """The same chunked algorithm with the torch cross-entropy reference: the CPU path (memory stays bounded)."""
    return _fused(cross_entropy.reference_row_losses, cross_entropy.reference_sum_losses, hidden, weight, targets,
                  ignore_index, grad_scale, chunk_rows, compute_weight_grad)


fused_linear_cross_entropy = dispatch(forward, reference)
