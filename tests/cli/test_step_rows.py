"""TrainStep's choice of attention layout per micro-batch: rows that are one document each (positions 0..seq-1 in
every row) go to the model without position ids and cu_seqlens (dense causal attention per row); anything else is
packed (cu_seqlens buckets, FlashAttention varlen)."""

import torch

from surogate.cli.step import ROWS_BUCKET, cu_seqlens_bucket, rows_are_documents


def test_rows_are_documents():
    seq = 16
    plain = torch.arange(seq).expand(3, seq).contiguous()
    assert rows_are_documents(plain)
    packed = plain.clone()
    packed[1, 9:] = torch.arange(seq - 9)  # a second document in row 1
    assert not rows_are_documents(packed)
    shifted = plain + 1  # one document per row, but not starting at position 0
    assert not rows_are_documents(shifted)
    # the rows bucket never collides with a cu_seqlens bucket (those are >= 2 long)
    assert ROWS_BUCKET < 2 <= cu_seqlens_bucket(plain).numel()
