"""Collectives on flat-buffer spans, with a world-size-1 path that makes no call at all.

Averaging: NCCL reduces with ReduceOp.AVG in one pass; gloo (and torch builds without AVG for it) sums, and the
caller multiplies by `post_scale` = 1/world_size after the wait. Reductions run in the buffer's dtype (fp32 grads
in fp32). Reduce-scatter and all-gather run in place: the rank's chunk is a view inside the bucket.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as tdist

from .world import World

# torch >= 2.13 renamed the single-tensor collectives; older versions only have the *_tensor names.
_reduce_scatter = getattr(tdist, "reduce_scatter_single", None) or tdist.reduce_scatter_tensor
_all_gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor


class Handle:
    """A launched collective: `wait()` blocks (gloo) or orders the current CUDA stream after it (NCCL), then runs
    the follow-up (scaling, accumulation) once."""

    def __init__(self, work: tdist.Work | None = None, then: Callable[[], None] | None = None):
        self._work = work
        self._then = then

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._then is not None:
            then, self._then = self._then, None
            then()


def reduce_op(world: World, average: bool) -> tuple[tdist.ReduceOp, float]:
    """(op, post_scale): the reduction to launch and the factor to apply to its result afterwards."""
    if not average or world.world_size == 1:
        return tdist.ReduceOp.SUM, 1.0
    if world.backend == "nccl":
        return tdist.ReduceOp.AVG, 1.0
    return tdist.ReduceOp.SUM, 1.0 / world.world_size


def all_reduce(world: World, t: torch.Tensor, op: tdist.ReduceOp, then=None) -> Handle:
    if world.world_size == 1 or t.numel() == 0:
        return Handle(None, then)
    return Handle(tdist.all_reduce(t, op=op, async_op=True), then)


def reduce_scatter_(world: World, bucket: torch.Tensor, op: tdist.ReduceOp, then=None) -> Handle:
    """Reduce `bucket` over ranks; rank r's chunk of it (bucket.view(W, -1)[r]) receives its reduced part."""
    if world.world_size == 1 or bucket.numel() == 0:
        return Handle(None, then)
    own = bucket.view(world.world_size, -1)[world.rank]
    return Handle(_reduce_scatter(own, bucket, op=op, async_op=True), then)


def all_gather_(world: World, bucket: torch.Tensor, then=None, src: torch.Tensor | None = None) -> Handle:
    """Fill `bucket` with every rank's chunk: this rank's comes from `src` (the collective copies it: no separate
    copy kernel), or is already in place when src is None."""
    own = bucket.view(world.world_size, -1)[world.rank] if bucket.numel() else bucket
    if world.world_size == 1 or bucket.numel() == 0:
        if src is not None:
            own.copy_(src)
        return Handle(None, then)
    return Handle(_all_gather(bucket, own if src is None else src, async_op=True), then)
