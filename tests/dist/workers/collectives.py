"""World facts, metric reductions, all_reduce_grads and ShardedParameters on W ranks; asserts on every rank.

mpiexec -n 2 python tests/dist/workers/collectives.py
"""

from __future__ import annotations

import surogate.dist as sd
import torch


def main() -> None:
    with sd.abort_on_error():
        world = sd.init("cpu")
        w, r = world.world_size, world.rank
        assert w > 1 and world.backend == "gloo" and world.is_main == (r == 0), world
        assert world.node_count == 1 and world.local_size == w and world.local_rank == r, world

        # metrics: numbers and tensors
        assert world.sum(r + 1) == w * (w + 1) / 2
        assert world.host_sum(r + 1) == w * (w + 1) // 2 and isinstance(world.host_sum(r), int)
        assert world.mean(float(r)) == (w - 1) / 2
        assert world.max(torch.tensor([r, -r])).tolist() == [w - 1, 0]
        assert world.broadcast_object({"run": "abc"} if r == 0 else None) == {"run": "abc"}
        assert world.local_slice(4 * w) == slice(4 * r, 4 * r + 4)

        # all_reduce_grads: mean (several buckets, a ragged last one) and sum
        def grads_of(rank: int) -> torch.Tensor:
            return torch.randn(1001, generator=torch.Generator().manual_seed(rank))

        mean = sum(grads_of(q) for q in range(w)) / w
        for bucket_numel in (100, 0):
            g = grads_of(r)
            sd.all_reduce_grads(world, g, bucket_numel=bucket_numel)
            torch.testing.assert_close(g, mean, rtol=1e-6, atol=1e-6)
        g = grads_of(r)
        sd.all_reduce_grads(world, g, average=False)
        torch.testing.assert_close(g, mean * w, rtol=1e-6, atol=1e-5)

        # ShardedParameters: a bf16 shard gathers back the full (bf16) weights of any group, prefetched or not
        layout = sd.FlatLayout([70, 0, 33, 129], w, bucket_numel=0)
        full = layout.from_canonical(torch.randn(layout.canonical_numel, generator=torch.Generator().manual_seed(3)))
        sharded = sd.ShardedParameters(world, layout, layout.shard_of(full, r).bfloat16())
        sharded.prefetch(2)
        for g in (2, 0, 1, 3):
            assert torch.equal(sharded.gather(g), full[layout.group_span(g)].bfloat16()), g
            sharded.release(g)
        sharded.release_all()
        print(f"rank {r}: collectives ok", flush=True)
        sd.shutdown()


if __name__ == "__main__":
    main()
