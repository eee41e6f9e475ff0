"""FlatLayout shard math: buckets, padding, equal shards, canonical order (no communication)."""

import pytest
import torch
from surogate.dist import FlatLayout

GROUPS = [
    [7],
    [156, 156, 156, 65],
    [0, 48, 48, 0, 48, 0],
    [1000, 3, 1, 2050, 17],
]


@pytest.mark.parametrize("sizes", GROUPS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("bucket_numel", [0, 100, 10**9])
def test_shards_tile_the_buffer(sizes, world_size, bucket_numel, generator):
    layout = FlatLayout(sizes, world_size, bucket_numel=bucket_numel, align=4)
    # buckets are contiguous, padded to world_size * align, and split into equal chunks
    at = shard_at = 0
    for bucket in layout.buckets:
        assert bucket.start == at and bucket.shard_start == shard_at
        assert bucket.numel % (world_size * 4) == 0 and bucket.chunk * world_size == bucket.numel
        used = sum(sizes[g] for g in bucket.groups)
        assert used <= bucket.numel < used + world_size * 4
        at += bucket.numel
        shard_at += bucket.chunk
    assert layout.numel == at and layout.shard_numel * world_size == layout.numel
    assert sorted(g for b in layout.buckets for g in b.groups) == list(range(len(sizes)))
    if bucket_numel <= 0:
        assert all(len(b.groups) == 1 for b in layout.buckets)
    if bucket_numel >= 10**9:
        assert len(layout.buckets) == 1

    # groups sit inside their bucket, in order, without overlap
    for g, n in enumerate(sizes):
        bucket = layout.buckets[layout.group_bucket[g]]
        span = layout.group_span(g)
        assert bucket.start <= span.start and span.stop <= bucket.start + bucket.numel
        inner = layout.group_span_in_bucket(g)
        assert inner.start == span.start - bucket.start and inner.stop - inner.start == n

    # canonical round trip; padding comes back zero
    canonical = torch.randn(sum(sizes), generator=generator)
    flat = layout.from_canonical(canonical)
    assert torch.equal(layout.to_canonical(flat), canonical)
    assert flat.abs().sum() == pytest.approx(canonical.abs().sum().item(), rel=1e-6)

    # the ranks' shards, put back chunk by chunk, rebuild the flat buffer
    rebuilt = torch.empty_like(flat)
    for r in range(world_size):
        shard = layout.shard_of(flat, r)
        assert shard.numel() == layout.shard_numel
        for bucket in layout.buckets:
            rebuilt[bucket.chunk_span(r)] = shard[bucket.shard_span]
    assert torch.equal(rebuilt, flat)


def test_buckets_merge_groups_up_to_the_threshold():
    layout = FlatLayout([156, 156, 156, 65], 2, bucket_numel=200, align=32)
    assert [b.groups for b in layout.buckets] == [(0, 1), (2, 3)]
    assert [b.numel for b in layout.buckets] == [320, 256]  # 312 -> 320, 221 -> 256 (multiples of 64)
    assert layout.shard_numel == 288


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="world_size"):
        FlatLayout([4], 0)
    with pytest.raises(ValueError, match="group sizes"):
        FlatLayout([4, -1], 2)
    layout = FlatLayout([4, 5], 2)
    with pytest.raises(ValueError, match="holds 9 parameters"):
        layout.from_canonical(torch.zeros(10))
    with pytest.raises(ValueError, match="layout needs"):
        layout.to_canonical(torch.zeros(9))
