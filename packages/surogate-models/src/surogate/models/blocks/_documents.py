"""Packed rows: where documents start, for document-masked attention, and the RoPE positions.

A document starts at the first token of each row and wherever a position id is not the previous one + 1
(position ids reset per packed document). Attention never crosses a document boundary.
Without position ids and cu_seqlens every row is one causal document (`rows_are_documents`): the blocks may then
use dense causal attention per row (cuDNN), the same numbers as FlashAttention varlen up to bf16 rounding.
Callers that capture CUDA graphs pass cu_seqlens themselves (int32 on the device, over the flattened tokens,
a start at every row start, optionally padded at the end with repeats of the token count = empty documents,
which FlashAttention skips); then nothing here reads a value back to the host.
- FlashAttention varlen (CUDA, bf16/fp16): cu_seqlens int32 [documents + 1], max_seqlen = the row length (an
  upper bound: FlashAttention only sizes its grid with it). Finding the documents from position ids costs one
  host sync per forward; without position ids (one document per row) or with cu_seqlens given, none.
- reference attention (CPU, or fp32 on CUDA): the boolean causal + block-diagonal mask [batch, 1, seq, seq].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Documents:
    batch: int
    seq: int
    position_ids: torch.Tensor  # [batch * seq] int32 (what the RoPE kernels read): RoPE positions
    cu_seqlens: torch.Tensor | None = None  # FlashAttention
    max_seqlen: int = 0
    mask: torch.Tensor | None = None  # reference attention: [batch, 1, seq, seq] bool, True = may attend
    rows_are_documents: bool = False  # one causal document per row (no position ids, no cu_seqlens given)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] position ids -> [batch, seq] bool, True where a document starts."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def build_documents(batch: int, seq: int, position_ids: torch.Tensor | None, device: torch.device, flash: bool,
                    cu_seqlens: torch.Tensor | None = None) -> Documents:
    """position_ids [batch, seq] or None (then 0..seq-1 in every row). Documents come from cu_seqlens when given,
    else from the position ids, else one per row. flash: build cu_seqlens, else the reference attention's mask."""
    packed = position_ids is not None
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).expand(batch, seq)
    position_ids = position_ids.to(device=device, dtype=torch.int64)
    docs = Documents(batch, seq, position_ids.reshape(-1).to(torch.int32).contiguous(),
                     rows_are_documents=not packed and cu_seqlens is None)
    if flash:
        if cu_seqlens is not None:
            docs.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        else:
            if packed:
                starts = torch.nonzero(document_starts(position_ids).reshape(-1)).reshape(-1)  # host sync
            else:
                starts = torch.arange(0, batch * seq, seq, device=device)
            end = torch.full((1,), batch * seq, device=device, dtype=starts.dtype)
            docs.cu_seqlens = torch.cat([starts, end]).to(torch.int32)
        docs.max_seqlen = seq
    else:
        if cu_seqlens is not None:
            tokens = torch.arange(batch * seq, device=device)
            doc_ids = torch.searchsorted(cu_seqlens.to(device=device, dtype=torch.int64)[1:], tokens, right=True)
            doc_ids = doc_ids.view(batch, seq)
        else:
            doc_ids = torch.cumsum(document_starts(position_ids).to(torch.int64), dim=1)
        same = doc_ids[:, :, None] == doc_ids[:, None, :]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        docs.mask = (same & causal).unsqueeze(1)
    return docs
