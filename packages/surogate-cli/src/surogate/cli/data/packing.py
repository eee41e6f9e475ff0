"""Packing documents into rows of exactly sequence_len tokens.

A document is (ids [L], trained [L]): trained[t] says whether token t is a target. In a row, position t's label is
the NEXT token of the same document when that token is trained, else -100; a document's last position has label
-100 (nothing of it follows). Position ids restart at 0 for every document, which is what the model uses for
document masking: attention never crosses a document boundary. Rows are filled greedily in document order (the
caller shuffles first); the tail of a row is padding: pad_id tokens, labels -100, its own run of position ids.

Documents longer than sequence_len: chat examples are deleted or truncated (truncation_strategy); raw text is cut
into sequence_len pieces, each a document of its own. Both are counted by the caller.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def split_long_text(ids: np.ndarray, trained: np.ndarray, seq: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(ids[i:i + seq], trained[i:i + seq]) for i in range(0, len(ids), seq) if len(ids[i:i + seq]) > 1]


def pack(docs: list[tuple[np.ndarray, np.ndarray]], seq: int, pad_id: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """-> input_ids, labels, position_ids (int32 [n_rows, seq]) and stats (rows, tokens, trained, padding)."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    current: list[tuple[np.ndarray, np.ndarray]] = []
    used = 0
    for ids, trained in docs:
        n = len(ids)
        if n > seq:
            raise ValueError(f"document of {n} tokens does not fit sequence_len {seq}")  # callers split or drop first
        if used + n > seq:
            rows.append(current)
            current, used = [], 0
        current.append((ids, trained))
        used += n
    if current:
        rows.append(current)

    input_ids = np.full((len(rows), seq), pad_id, dtype=np.int32)
    labels = np.full((len(rows), seq), IGNORE, dtype=np.int32)
    position_ids = np.zeros((len(rows), seq), dtype=np.int32)
    for r, row in enumerate(rows):
        at = 0
        for ids, trained in row:
            n = len(ids)
            input_ids[r, at:at + n] = ids
            labels[r, at:at + n - 1] = np.where(trained[1:], ids[1:], IGNORE)
            position_ids[r, at:at + n] = np.arange(n, dtype=np.int32)
            at += n
        position_ids[r, at:] = np.arange(seq - at, dtype=np.int32)
    n_tokens = int(sum(len(ids) for ids, _ in docs))
    stats = {"rows": len(rows), "tokens": n_tokens, "trained_tokens": int((labels != IGNORE).sum()),
             "padding_tokens": len(rows) * seq - n_tokens}
    return input_ids, labels, position_ids, stats
