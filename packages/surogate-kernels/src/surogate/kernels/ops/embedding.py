"""Embedding lookup and its deterministic backward (no float atomics).

Forward: out[t] = table[ids[t]]: a copy, moved as the widest words the row allows (8, 4 or 2 bytes), one block per
token. An id outside [0, V) gives a row of all-ones bits (NaN in bf16 and fp32) on the GPU, where raising would
need a host sync; the CPU reference raises.
Backward: dtable[v] = sum of dx[t] over the tokens t with ids[t] == v, summed in fp32 in token order, written in
dx's dtype (or fp32 when asked). torch.sort(ids, stable=True) groups equal ids (ties keep token order); then each
block owns ROWS_PER_BLOCK consecutive vocabulary rows x one column tile, finds its first id by binary search in
the sorted ids and walks them: every dtable row is written exactly once (zeros for ids absent from the batch), so
there is no memset, no atomics, and the result is bitwise reproducible. Shapes are static: CUDA-graph capturable.
Ids that are out of range are ignored by the backward.
Shapes: ids [...] int32 / int64; table [V, C] fp32 or bf16; dx [..., C] in the table's dtype.
"""

from __future__ import annotations

import torch
from numba import cuda, float32, int16, int32, int64

from .._packed import CODECS, WIDE
from .._runtime import Kernel, ceil_div, dispatch, element_type, round_up

STEP = 4  # words each thread moves per row before storing: 4 loads in flight per thread
ROWS_PER_BLOCK = 32  # vocabulary rows per backward block: 151936 / 32 = 4748 blocks, each one binary search
_WORDS = {8: ("int64", int64, torch.int64), 4: ("int32", int32, torch.int32), 2: ("int16", int16, torch.int16)}


def _threads_for(n_words: int) -> int:
    return min(256, max(32, round_up(ceil_div(n_words, STEP), 32)))


# ---------------------------------------------------------------------------------------------------- kernels
def _make_forward(word_type):
    def embedding_fwd(ids, table, out):
        """table, out: rows of words. One block per token."""
        token = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n_words = table.shape[1]
        words = cuda.local.array(STEP, word_type)
        row = ids[token]
        if row >= 0 and row < table.shape[0]:
            for base in range(0, n_words, nt * STEP):
                for k in range(STEP):
                    i = base + k * nt + tid
                    if i < n_words:
                        words[k] = table[row, i]
                for k in range(STEP):
                    i = base + k * nt + tid
                    if i < n_words:
                        out[token, i] = words[k]
        else:
            for i in range(tid, n_words, nt):
                out[token, i] = word_type(-1)  # all bits set: NaN

    return embedding_fwd


def _make_backward(codec_in, codec_out):
    P = codec_in.per_word
    unpack, pack = codec_in.unpack, codec_out.pack
    VALS = STEP * P

    def embedding_bwd(dx, sorted_ids, order, dtable):
        """dx [tokens, C / P], dtable [V, C / P] words. Block (x, y): vocabulary rows x, column tile y."""
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n_words = dtable.shape[1]
        n_tokens = sorted_ids.shape[0]
        first = cuda.blockIdx.x * ROWS_PER_BLOCK
        last = min(dtable.shape[0], first + ROWS_PER_BLOCK)
        column = cuda.blockIdx.y * nt * STEP + tid
        acc = cuda.local.array(VALS, float32)
        lo = 0  # first sorted position with id >= first (ids < 0 sort before every row)
        hi = n_tokens
        while lo < hi:
            mid = (lo + hi) // 2
            if sorted_ids[mid] < first:
                lo = mid + 1
            else:
                hi = mid
        j = lo
        for v in range(first, last):
            for q in range(VALS):
                acc[q] = float32(0.0)
            while j < n_tokens and sorted_ids[j] == v:
                token = order[j]
                for k in range(STEP):
                    c = column + k * nt
                    if c < n_words:
                        w = dx[token, c]
                        for p in range(P):
                            acc[k * P + p] += unpack(w, p)
                j += 1
            for k in range(STEP):
                c = column + k * nt
                if c < n_words:
                    dtable[v, c] = pack(acc, k * P)

    return embedding_bwd


_forward = {
    size: Kernel(_make_forward(numba_type), f"void(int64[::1], {name}[:, ::1], {name}[:, ::1])",
                 f"embedding_fwd[{name}]")
    for size, (name, numba_type, _) in _WORDS.items()
}
_BACKWARD_KEYS = [  # (dx dtype, dtable dtype, values per word)
    (torch.float32, torch.float32, 1), (torch.bfloat16, torch.bfloat16, 1), (torch.bfloat16, torch.float32, 1),
    (torch.float32, torch.float32, 2), (torch.bfloat16, torch.bfloat16, 4), (torch.bfloat16, torch.float32, 2),
]
_backward = {}
for _in, _out, _p in _BACKWARD_KEYS:
    _ci, _co = CODECS[_in, _p], CODECS[_out, _p]
    _backward[_in, _out, _p] = Kernel(
        _make_backward(_ci, _co), f"void({_ci.word}[:, ::1], int64[::1], int64[::1], {_co.word}[:, ::1])",
        f"embedding_bwd[{str(_in)[6:]}->{str(_out)[6:]}x{_p}]",
    )


# ---------------------------------------------------------------------------------------------------- launchers
def _word_bytes(t: torch.Tensor, row_bytes: int) -> int:
    for size in (8, 4, 2):
        if row_bytes % size == 0 and t.data_ptr() % size == 0:
            return size
    raise ValueError(f"rows of {row_bytes} bytes cannot be moved in 2-byte words")


def _check_backward(dx: torch.Tensor, ids: torch.Tensor):
    if dx.numel() != ids.numel() * dx.shape[-1]:
        raise ValueError(f"dx must hold one row per id: ids {tuple(ids.shape)}, dx {tuple(dx.shape)}")


def forward(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Numba kernel. ids [...] -> [..., C] rows of table."""
    element_type(table.dtype)
    if table.dim() != 2:
        raise ValueError(f"table must be [num_embeddings, dim], got shape {tuple(table.shape)}")
    table = table.contiguous()
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
    if flat.shape[0] and table.shape[1]:
        size = _word_bytes(table, table.shape[1] * table.element_size())  # out is fresh: aligned
        word_dtype = _WORDS[size][2]
        words = table.view(word_dtype)
        _forward[size].launch(flat.shape[0], _threads_for(words.shape[1]), (flat, words, out.view(word_dtype)))
    return out.view(*ids.shape, table.shape[1])


def backward(dx: torch.Tensor, ids: torch.Tensor, num_embeddings: int, dtype: torch.dtype | None = None):
    """Numba kernel. dx [..., C], ids [...] -> dtable [num_embeddings, C] in `dtype` (default dx.dtype)."""
    element_type(dx.dtype)
    out_dtype = dtype or dx.dtype
    if (dx.dtype, out_dtype, 1) not in _backward:
        raise TypeError(f"embedding backward writes {dx.dtype} or float32 gradients, not {out_dtype}")
    _check_backward(dx, ids)
    n_cols = dx.shape[-1]
    dx2 = dx.reshape(-1, n_cols).contiguous()
    flat = ids.reshape(-1).to(torch.int64)
    sorted_ids, order = torch.sort(flat, stable=True)
    dtable = torch.empty(num_embeddings, n_cols, dtype=out_dtype, device=dx.device)
    if num_embeddings == 0 or n_cols == 0:
        return dtable
    p = WIDE[torch.float32] if out_dtype == torch.float32 else WIDE[dx.dtype]
    if n_cols % p or dx2.data_ptr() % (p * dx2.element_size()):
        p = 1
    words_in = dx2 if p == 1 else dx2.view(CODECS[dx.dtype, p].torch_word)
    words_out = dtable if p == 1 else dtable.view(CODECS[out_dtype, p].torch_word)
    threads = _threads_for(words_out.shape[1])
    grid = (ceil_div(num_embeddings, ROWS_PER_BLOCK), ceil_div(words_out.shape[1], threads * STEP))
    _backward[dx.dtype, out_dtype, p].launch(grid, threads, (words_in, sorted_ids, order, words_out))
    return dtable


# ---------------------------------------------------------------------------------------------------- reference
def reference_forward(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Plain torch: the oracle for tests and the CPU path."""
    return torch.nn.functional.embedding(ids.long(), table)


def reference_backward(dx: torch.Tensor, ids: torch.Tensor, num_embeddings: int, dtype: torch.dtype | None = None):
    _check_backward(dx, ids)
    n_cols = dx.shape[-1]
    compute = torch.promote_types(dx.dtype, torch.float32)
    dtable = torch.zeros(num_embeddings, n_cols, dtype=compute, device=dx.device)
    dtable.index_add_(0, ids.reshape(-1).long(), dx.reshape(-1, n_cols).to(compute))
    return dtable.to(dtype or dx.dtype)


embedding_forward = dispatch(forward, reference_forward)
embedding_backward = dispatch(backward, reference_backward)
