"""Shard math for flat parameter/gradient buffers: groups, buckets, padding, each rank's chunks.

The trainer keeps its trainable parameters in one flat buffer, ordered by *groups* (typically: embeddings,
layer 0, ..., layer L-1, final norm + head; a group may be empty). Consecutive groups are merged into *buckets*
of about `bucket_numel` elements: a bucket is the unit of one collective (all-reduce for data parallel,
reduce-scatter/all-gather for ZeRO). Each bucket is zero-padded at its end to a multiple of
`world_size * align` elements, so it splits into `world_size` equal *chunks*; rank r owns chunk r of every
bucket. A rank's *shard* is its chunks of all buckets, concatenated: a contiguous buffer of `shard_numel`
elements that holds the rank's fp32 master weights, gradient shard and optimizer state (ZeRO-1/2/3).

    flat:  | bucket 0: g0 g1 pad            | bucket 1: g2 pad        |
           | chunk r=0      | chunk r=1      | chunk r=0 | chunk r=1   |
    shard of rank 1:  [bucket 0 chunk 1][bucket 1 chunk 1]

Optimizers over flat buffers are elementwise (AdamW), so the interleaved shard order does not change the math;
padding elements stay zero (zero grad, zero weight). With `bucket_numel <= 0` every group is its own bucket
(ZeRO-3 gathers per layer). `align` = 32 elements keeps every chunk 128-byte aligned in fp32 (64 in bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 25 * 2**20  # 25 MiB per bucket, as torch DDP; fp32 grads -> 6.5M elements
DEFAULT_BUCKET_NUMEL = DEFAULT_BUCKET_BYTES // 4


@dataclass(frozen=True)
class Bucket:
    """One collective's span of the flat buffer."""

    index: int
    start: int  # offset in the flat buffer
    numel: int  # padded size: a multiple of world_size * align (0 for a bucket of empty groups)
    chunk: int  # numel // world_size: what each rank owns
    shard_start: int  # offset of this bucket's chunk in every rank's shard
    groups: tuple[int, ...]

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + self.numel)

    def chunk_span(self, rank: int) -> slice:
        """Rank `rank`'s chunk, as a slice of the flat buffer."""
        begin = self.start + rank * self.chunk
        return slice(begin, begin + self.chunk)

    @property
    def shard_span(self) -> slice:
        """This bucket's chunk, as a slice of a rank's shard."""
        return slice(self.shard_start, self.shard_start + self.chunk)


class FlatLayout:
    """Where each group lives in the flat buffer and which part of it each rank owns.

    Args:
        group_sizes: elements per group, in flat-buffer order (0 allowed, e.g. frozen embeddings under LoRA).
        world_size: number of ranks the buffer is sharded over.
        bucket_numel: merge consecutive groups until a bucket holds at least this many elements;
            <= 0 gives one bucket per group.
        align: chunk sizes are multiples of this many elements.
    """

    def __init__(
        self,
        group_sizes: Sequence[int],
        world_size: int,
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        align: int = 32,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if align < 1:
            raise ValueError(f"align must be >= 1, got {align}")
        sizes = [int(n) for n in group_sizes]
        if any(n < 0 for n in sizes):
            raise ValueError(f"group sizes must be >= 0, got {sizes}")
        self.group_sizes: tuple[int, ...] = tuple(sizes)
        self.world_size = world_size
        self.bucket_numel = bucket_numel
        self.align = align

        # Close a bucket once it holds >= bucket_numel elements; the last bucket takes what is left.
        members: list[list[int]] = [[]]
        filled = 0
        for g, n in enumerate(sizes):
            members[-1].append(g)
            filled += n
            if (bucket_numel <= 0 or filled >= bucket_numel) and g != len(sizes) - 1:
                members.append([])
                filled = 0

        unit = world_size * align
        buckets: list[Bucket] = []
        offsets = [0] * len(sizes)
        group_bucket = [0] * len(sizes)
        start = shard_start = 0
        for b, groups in enumerate(members):
            at = start
            for g in groups:
                offsets[g] = at
                group_bucket[g] = b
                at += sizes[g]
            used = at - start
            numel = -(-used // unit) * unit
            buckets.append(Bucket(b, start, numel, numel // world_size, shard_start, tuple(groups)))
            start += numel
            shard_start += numel // world_size
        self.buckets: tuple[Bucket, ...] = tuple(buckets)
        self.group_offsets: tuple[int, ...] = tuple(offsets)
        self.group_bucket: tuple[int, ...] = tuple(group_bucket)
        self.numel = start  # the flat buffer's size, padding included
        self.shard_numel = shard_start  # each rank's shard size
        self.canonical_numel = sum(sizes)  # the parameters without padding
        self._canonical_offsets = [sum(sizes[:g]) for g in range(len(sizes))]

    def __repr__(self) -> str:
        return (
            f"FlatLayout(groups={len(self.group_sizes)}, buckets={len(self.buckets)}, numel={self.numel}, "
            f"params={self.canonical_numel}, world_size={self.world_size}, shard_numel={self.shard_numel})"
        )

    def group_span(self, group: int) -> slice:
        """Group `group` as a slice of the flat buffer."""
        return slice(self.group_offsets[group], self.group_offsets[group] + self.group_sizes[group])

    def group_span_in_bucket(self, group: int) -> slice:
        """Group `group` as a slice of its bucket (what ZeRO-3 gathers)."""
        begin = self.group_offsets[group] - self.buckets[self.group_bucket[group]].start
        return slice(begin, begin + self.group_sizes[group])

    def canonical_span(self, group: int) -> slice:
        """Group `group` as a slice of the canonical (unpadded) buffer."""
        begin = self._canonical_offsets[group]
        return slice(begin, begin + self.group_sizes[group])

    def to_canonical(self, flat: torch.Tensor) -> torch.Tensor:
        """The groups of a flat buffer concatenated without padding (independent of world size and buckets)."""
        self._check_flat(flat)
        return torch.cat([flat[self.group_span(g)] for g in range(len(self.group_sizes))])

    def from_canonical(self, canonical: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of `to_canonical`: a padded flat buffer (padding zero) from the unpadded groups."""
        if canonical.dim() != 1 or canonical.numel() != self.canonical_numel:
            raise ValueError(
                f"canonical buffer has shape {tuple(canonical.shape)}, this layout holds {self.canonical_numel} "
                "parameters (group sizes differ: was it saved from another model or LoRA config?)"
            )
        if out is None:
            out = torch.zeros(self.numel, dtype=canonical.dtype, device=canonical.device)
        else:
            self._check_flat(out)
            out.zero_()
        for g in range(len(self.group_sizes)):
            out[self.group_span(g)].copy_(canonical[self.canonical_span(g)])
        return out

    def shard_of(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s chunks of a flat buffer, concatenated (a copy): its shard."""
        self._check_flat(flat)
        if self.shard_numel == 0:
            return flat.new_zeros(0)
        return torch.cat([flat[b.chunk_span(rank)] for b in self.buckets])

    def _check_flat(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat buffer has shape {tuple(flat.shape)}, the layout needs ({self.numel},)")
