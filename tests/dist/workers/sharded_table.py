"""ZeRO-3's sparse embedding lookup (surogate.dist.sharded_embedding.ShardedTable) on W ranks; asserts on every rank.

    mpiexec -n 2 python tests/dist/workers/sharded_table.py [--device cuda]

A [13, 6] table bound after 5 other elements, so shard boundaries cut rows; every rank looks up its own tokens
(repeats included). The lookup equals the table's rows bit for bit; the gradient shard receives the mean (or the
sum) over ranks of the dense index_add of every rank's row gradients. On CUDA also with a bf16 table (NCCL).
"""

from __future__ import annotations

import argparse

import surogate.dist as sd
import torch
from surogate.dist.sharded_embedding import ShardedTable

ROWS, COLS, LEAD = 13, 6, 5


def ids_of(rank: int) -> torch.Tensor:
    return torch.randint(0, ROWS, (9,), generator=torch.Generator().manual_seed(10 + rank))


def grad_of(rank: int) -> torch.Tensor:
    return torch.randn(9, COLS, generator=torch.Generator().manual_seed(20 + rank))


def check(world, dtype: torch.dtype, average: bool) -> None:
    w, r, device = world.world_size, world.rank, world.device
    layout = sd.FlatLayout([LEAD + ROWS * COLS], w, bucket_numel=0)
    canonical = torch.randn(layout.canonical_numel, generator=torch.Generator().manual_seed(4)).to(dtype)
    table = canonical[LEAD:].view(ROWS, COLS)
    dp = sd.DataParallel(world, layout, layout.from_canonical(canonical).to(device), None, zero=3, average=average,
                         make_state=lambda m: {})
    t = ShardedTable(dp, 0, LEAD, torch.Size([ROWS, COLS]))
    assert len(t.pieces) <= 3, t.pieces
    assert torch.equal(t.lookup(ids_of(r).to(device)).cpu(), table[ids_of(r)]), (dtype, average)
    t.add_grad(ids_of(r).to(device), grad_of(r).to(device, dtype))
    dense = torch.zeros(ROWS, COLS)
    for q in range(w):
        dense.index_add_(0, ids_of(q), grad_of(q).to(dtype).float())
    want = torch.zeros(layout.canonical_numel)
    want[LEAD:] = (dense / w if average else dense).reshape(-1)
    torch.testing.assert_close(dp.grad_shard.cpu(), layout.shard_of(layout.from_canonical(want), r), rtol=0,
                               atol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with sd.abort_on_error():
        world = sd.init(args.device)
        dtypes = [torch.float32] + ([torch.bfloat16] if world.device.type == "cuda" else [])
        for dtype in dtypes:
            for average in (True, False):
                check(world, dtype, average)
        print(f"rank {world.rank}: sharded table ok", flush=True)
        sd.shutdown()


if __name__ == "__main__":
    main()
