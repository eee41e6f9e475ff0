"""ZeRO-3 weights: each rank keeps its shard; full weights are all-gathered per bucket ahead of use, freed after.

Model code calls, per layer (a group of the FlatLayout; build the layout with bucket_numel=0 so that every
group is its own bucket and gathers exactly one layer):

    w = sharded.gather(layer)        # the layer's full flat weights (waits for a prefetch if one is in flight)
    sharded.prefetch(layer + 1)      # start the next layer's all-gather now, overlapping this layer's compute
    ... compute with views of w ...
    sharded.release(layer)           # drop the full copy (the caching allocator reuses its memory)

in forward, and again in reverse order in backward. A gather moves the bucket's padded size in the shard's
dtype (pass a bf16 shard to gather half the bytes of fp32). Buffers are fresh per gather (torch's caching
allocator makes that cheap); a gathered bucket stays cached until release, so gather twice costs one
collective. After the optimizer step changes the shard, call `release_all()` (DataParallel.step does).
"""

from __future__ import annotations

import torch

from ._comm import Handle, all_gather_
from .layout import FlatLayout
from .world import World


class ShardedParameters:
    """Full weights of one bucket at a time, gathered from every rank's shard.

    Args:
        world: the World from `init()`.
        layout: the FlatLayout of the flat parameter buffer (its world_size must match).
        shard: this rank's shard, `layout.shard_numel` elements, on world.device (any dtype).
    """

    def __init__(self, world: World, layout: FlatLayout, shard: torch.Tensor):
        if layout.world_size != world.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks, the world has {world.world_size}")
        if shard.dim() != 1 or shard.numel() != layout.shard_numel:
            raise ValueError(f"shard has shape {tuple(shard.shape)}, the layout needs ({layout.shard_numel},)")
        self.world = world
        self.layout = layout
        self.shard = shard
        self._full: dict[int, torch.Tensor] = {}
        self._inflight: dict[int, tuple[torch.Tensor, Handle]] = {}

    def prefetch(self, group: int) -> None:
        """Start gathering `group`'s bucket (no-op if it is gathered or in flight, or `group` is out of range)."""
        if not 0 <= group < len(self.layout.group_sizes):
            return
        b = self.layout.group_bucket[group]
        if b in self._full or b in self._inflight:
            return
        bucket = self.layout.buckets[b]
        full = torch.empty(bucket.numel, dtype=self.shard.dtype, device=self.shard.device)
        self._inflight[b] = (full, all_gather_(self.world, full, src=self.shard[bucket.shard_span]))

    def gather(self, group: int) -> torch.Tensor:
        """`group`'s full weights (a 1-D view of `layout.group_sizes[group]` elements)."""
        b = self.layout.group_bucket[group]
        if b not in self._full:
            self.prefetch(group)
            full, handle = self._inflight.pop(b)
            handle.wait()
            self._full[b] = full
        return self._full[b][self.layout.group_span_in_bucket(group)]

    def release(self, group: int) -> None:
        """Drop `group`'s gathered bucket (views handed out by gather keep their memory alive until dropped)."""
        b = self.layout.group_bucket[group]
        self._full.pop(b, None)

    def release_all(self) -> None:
        """Drop every gathered bucket and wait for gathers in flight (call after the shard changes)."""
        for _, handle in self._inflight.values():
            handle.wait()
        self._inflight.clear()
        self._full.clear()
