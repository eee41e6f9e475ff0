"""ZeRO-3 embedding lookup without gathering the table.

Forward: the ranks all-gather their token ids. Each rank looks every rank's tokens up in the rows (and partial rows)
of the table that its shard holds, zeros elsewhere, and a reduce-scatter of that [ranks * tokens, C] buffer hands
each rank the complete rows of its own tokens. Each element has exactly one rank that holds it, so the sum is exact.
A rank sends (ranks - 1) * tokens * C elements instead of receiving (ranks - 1) / ranks of the table.

Backward: the ranks all-gather their token ids and row gradients, and each adds the rows that fall into its shard
straight into its fp32 gradient shard, scaled like the reduce-scatter (mean or sum over ranks). The table then needs
no dense reduce-scatter at the end of backward, where nothing is left to hide it behind.

Every rank must look up the same number of tokens per call, since the collectives have static shapes. The trainer's
micro-batches are [micro_batch, seq_len] on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from ._comm import all_gather_, reduce_scatter_
from .data_parallel import DataParallel


class ShardedTable:
    """Where an embedding table [V, C], bound at `offset` into layout group `group` of a zero-3 engine, lies in this
    rank's shard: `pieces` lists (row_lo, row_hi, col_lo, col_hi, start), blocks of whole rows or one partial row,
    `start` being the block's first element in the bucket's shard (at most 3 pieces: head, whole rows, tail)."""

    def __init__(self, dp: DataParallel, group: int, offset: int, shape: torch.Size):
        if dp.zero != 3 or dp.sharded is None:
            raise ValueError("ShardedTable needs a zero=3 engine")
        layout, world = dp.layout, dp.world
        self.dp = dp
        self.rows, self.cols = int(shape[0]), int(shape[1])
        self.bucket = layout.buckets[layout.group_bucket[group]]
        per_rank = self.bucket.numel // world.world_size
        first = layout.group_span_in_bucket(group).start + offset  # the table's first element in the bucket
        held_lo = world.rank * per_rank  # this rank's shard: bucket elements [held_lo, held_lo + per_rank)
        lo = min(max(held_lo - first, 0), self.rows * self.cols)  # ... as table elements [lo, hi)
        hi = min(max(held_lo + per_rank - first, 0), self.rows * self.cols)
        self.pieces: list[tuple[int, int, int, int, int]] = []
        j, c = lo, self.cols
        while j < hi:
            row, col = divmod(j, c)
            if col == 0 and hi - j >= c:
                n = (hi - j) // c
                self.pieces.append((row, row + n, 0, c, j + first - held_lo))
                j += n * c
            else:
                end = min(c, col + hi - j)
                self.pieces.append((row, row + 1, col, end, j + first - held_lo))
                j += end - col

    def _blocks(self, flat: torch.Tensor):
        """((row_lo, row_hi, col_lo, col_hi), block) per piece, the block being the piece as a [rows, cols] view of
        `flat` (a tensor shaped like the bucket's shard: the weights shard or the gradient shard)."""
        for row_lo, row_hi, col_lo, col_hi, start in self.pieces:
            n, width = row_hi - row_lo, col_hi - col_lo
            yield (row_lo, row_hi, col_lo, col_hi), flat[start : start + n * width].view(n, width)

    def _everyone(self, t: torch.Tensor) -> torch.Tensor:
        """`t` of every rank, concatenated in rank order (all-gather: every rank passes the same shape)."""
        world = self.dp.world
        out = torch.empty(world.world_size * t.numel(), dtype=t.dtype, device=t.device)
        all_gather_(world, out, src=t.reshape(-1)).wait()
        return out

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for `ids` (1-D int64), [len(ids), C] in the shard's dtype. Collective."""
        world = self.dp.world
        shard = self.dp.sharded.shard[self.bucket.shard_span]
        all_ids = self._everyone(ids)
        partial = torch.zeros(all_ids.numel(), self.cols, dtype=shard.dtype, device=shard.device)
        for (row_lo, row_hi, col_lo, col_hi), block in self._blocks(shard):
            inside = (all_ids >= row_lo) & (all_ids < row_hi)
            rows = block.index_select(0, (all_ids - row_lo).clamp(0, row_hi - row_lo - 1))
            partial[:, col_lo:col_hi] += torch.where(inside[:, None], rows, 0)
        reduce_scatter_(world, partial.view(-1), tdist.ReduceOp.SUM).wait()
        return partial.view(world.world_size, ids.numel(), self.cols)[world.rank].clone()

    def add_grad(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Add every rank's row gradients `grad` [len(ids), C] for `ids` into this rank's gradient shard (fp32), as
        mean (the engine averages) or sum over ranks. Collective."""
        all_ids = self._everyone(ids)
        all_grads = self._everyone(grad.contiguous()).view(-1, self.cols)
        scale = 1.0 / self.dp.world.world_size if self.dp.average else 1.0
        for (row_lo, row_hi, col_lo, col_hi), block in self._blocks(self.dp.grad_shard[self.bucket.shard_span]):
            inside = (all_ids >= row_lo) & (all_ids < row_hi)
            rows = torch.where(inside[:, None], all_grads[:, col_lo:col_hi], 0).to(block.dtype)
            block.index_add_(0, (all_ids - row_lo).clamp(0, row_hi - row_lo - 1), rows, alpha=scale)
