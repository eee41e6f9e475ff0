"""Data parallel training over flat buffers: bucketed gradient reduction overlapped with backward, ZeRO-1/2/3.

Every rank runs the same model on its own rows; gradients are reduced over ranks bucket by bucket (FlatLayout),
each bucket launched asynchronously as soon as its groups' gradients are complete (`grad_ready`), all waited
for at the end of the micro-step. Reductions run in the gradient buffer's dtype (fp32 or the model's bf16; NCCL
accumulates bf16 in fp32 per hop, rounding each partial sum to bf16; ZeRO-3's per-bucket scratch has the dtype of
`params`, so a bf16 model reduce-scatters bf16 as zero 0-2 do); the ZeRO gradient shard is always fp32.
`average=True` divides by the world size (mean-reduced losses), `average=False` sums (the trainer already
divided by the global token count). Optimizer math is the caller's `step_fn(master, grads, state, work)`,
elementwise over flat buffers: it updates the fp32 master and state in place and, when `work` is not None (the
model reads another dtype, e.g. bf16), writes the new weights into `work` (rounded: nearest-even or stochastic).

What each rank holds (N = parameters, W = ranks):

    zero  params (model reads)  grads                       fp32 master + optim. state  reduction
    0     full                  full, all-reduced           full (params if fp32)       all-reduce, last micro-step
    1     full                  full + shard N/W            shard                       reduce-scatter, last micro-step
    2     full                  full scratch + shard N/W    shard                       reduce-scatter, each micro-step
    3     gathered per layer    per-bucket scratch + shard  shard                       reduce-scatter, each micro-step

ZeRO-1/2 all-gather the updated master shards into `params` after the step (cast to params' dtype, e.g. bf16);
ZeRO-3 keeps only the shard and gathers a layer at a time (`gather`/`prefetch`/`release`, ShardedParameters).
At ZeRO-2 the reduce-scattered micro-step gradients accumulate into the fp32 shard and the full buffer is zeroed
for the next micro-step: the full-size buffer is scratch the model writes into, not an accumulator.
`offload_grads=True` (ZeRO-2 only) keeps that fp32 shard in host memory (host_grad_shard.py): each reduced chunk
is added to it on the device through two alternating one-chunk staging buffers; the optimizer step copies the
shard to the device once (`grad_norm` and `step` share that copy, `zero_grad` drops it), so the device holds it
only while the step runs, not during forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as tdist

from ._comm import Handle, all_gather_, all_reduce, reduce_op, reduce_scatter_
from .host_grad_shard import HostGradShard
from .layout import DEFAULT_BUCKET_NUMEL, FlatLayout
from .sharded import ShardedParameters
from .world import World

# step_fn(master, grads, state, work): see the module docstring
StepFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None], None]
_MAX_INFLIGHT_ZERO3 = 2  # ZeRO-3 gradient scratch buckets in flight at once: bounds the scratch memory


def all_reduce_grads(
    world: World, grads: torch.Tensor, *, bucket_numel: int = DEFAULT_BUCKET_NUMEL, average: bool = True
) -> None:
    """All-reduce a flat gradient buffer in place, bucket by bucket (all launched, then all waited for)."""
    if world.world_size == 1:
        return
    op, post_scale = reduce_op(world, average)
    flat = grads.view(-1)
    size = bucket_numel if bucket_numel > 0 else max(flat.numel(), 1)
    handles = []
    for start in range(0, flat.numel(), size):
        span = flat[start : start + size]
        handles.append(all_reduce(world, span, op, (lambda s=span: s.mul_(post_scale)) if post_scale != 1 else None))
    for h in handles:
        h.wait()


def bind_parameters(
    layout: FlatLayout,
    groups: Sequence[Sequence[torch.nn.Parameter]],
    params: torch.Tensor,
    grads: torch.Tensor | None = None,
) -> None:
    """Copy each parameter into its place in `params` and make it a view there (`.grad` a view into `grads`).

    `groups[g]` are the parameters of layout group g, in order; their sizes must add up to the group's size.
    Autograd then accumulates into the flat gradient buffer in place: never set `.grad = None` afterwards.
    """
    if len(groups) != len(layout.group_sizes):
        raise ValueError(f"{len(groups)} parameter groups given, the layout has {len(layout.group_sizes)}")
    for g, plist in enumerate(groups):
        total = sum(p.numel() for p in plist)
        if total != layout.group_sizes[g]:
            raise ValueError(f"group {g} parameters hold {total} elements, the layout says {layout.group_sizes[g]}")
        at = layout.group_offsets[g]
        for p in plist:
            n = p.numel()
            params[at : at + n].copy_(p.detach().reshape(-1))
            p.data = params[at : at + n].view_as(p)
            if grads is not None:
                p.grad = grads[at : at + n].view_as(p)
            at += n


class DataParallel:
    """Gradient reduction and (ZeRO-sharded) optimizer step over flat buffers.

    Args:
        world: from `init()`.
        layout: FlatLayout(group_sizes, world.world_size, bucket_numel); `params`/`grads` are laid out by it.
        params: flat weights the model reads, `layout.numel` elements (fp32 or bf16), on world.device. At ZeRO-3
            only their shard is kept: drop your reference after construction.
        grads: flat gradient buffer (`layout.numel`, fp32 or bf16) the model accumulates into; None at ZeRO-3
            (the engine hands out per-bucket scratch, in params' dtype, through `grad_buffer`).
        zero: 0 (plain data parallel), 1, 2 or 3.
        make_state: builds the optimizer state from the fp32 master (full or shard), e.g.
            `lambda p: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}`.
        average: mean (True) or sum (False) of the gradients over ranks.
        sync_params: broadcast rank 0's params first, so every rank starts from the same weights.
        offload_grads: keep the fp32 gradient shard in host memory (zero=2 only; see the module docstring).
    """

    def __init__(
        self,
        world: World,
        layout: FlatLayout,
        params: torch.Tensor,
        grads: torch.Tensor | None = None,
        *,
        zero: int = 0,
        make_state: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        average: bool = True,
        sync_params: bool = True,
        offload_grads: bool = False,
    ):
        if zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero!r}")
        if offload_grads and zero != 2:
            raise ValueError(f"offload_grads keeps ZeRO-2's gradient shard in host memory: zero must be 2, not {zero}")
        if layout.world_size != world.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks, the world has {world.world_size}")
        _check_flat("params", params, layout.numel, world.device)
        if zero == 3 and grads is not None:
            raise ValueError("zero=3 keeps no full gradient buffer: pass grads=None and use grad_buffer(group)")
        if zero < 3:
            if grads is None:
                raise ValueError(f"zero={zero} needs the flat gradient buffer `grads`")
            _check_flat("grads", grads, layout.numel, world.device)
        self.world = world
        self.layout = layout
        self.zero = zero
        self.average = average
        self._op, self._post_scale = reduce_op(world, average)
        if sync_params and world.world_size > 1:
            tdist.broadcast(params, src=0)

        self.params: torch.Tensor | None = params if zero < 3 else None
        self.grads: torch.Tensor | None = grads
        self.grad_shard: torch.Tensor | None = None
        self.offload_grads = offload_grads
        self._host_grads: HostGradShard | None = None  # offload_grads: the fp32 shard in host memory
        self.sharded: ShardedParameters | None = None
        # `work`: where step_fn writes the new weights in the model's dtype (None when the model reads the fp32
        # master itself): params (ZeRO-0), a shard that is then all-gathered (ZeRO-1/2), the ZeRO-3 shard.
        self.work: torch.Tensor | None = None
        if zero == 0:
            self.master = params if params.dtype == torch.float32 else params.float()
            if self.master is not params:
                self.work = params
        else:
            self.master = layout.shard_of(params, world.rank).float()
            if offload_grads:
                chunk = max((b.chunk for b in layout.buckets), default=0)
                self._host_grads = HostGradShard(layout.shard_numel, chunk, world.device)
                self.grad_shard = self._host_grads.host
            else:
                self.grad_shard = torch.zeros_like(self.master)
            if params.dtype != torch.float32:
                self.work = self.master.to(params.dtype)
        if zero == 3:
            self.sharded = ShardedParameters(world, layout, self.master if self.work is None else self.work)
        self.state = make_state(self.master)
        if not isinstance(self.state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self.state.items()
        ):
            raise TypeError("make_state must return a dict of str -> torch.Tensor")

        n = len(layout.buckets)
        self._in_micro = False
        self._reducing = False
        self._ready: set[int] = set()
        self._left = [0] * n
        self._launched = [False] * n
        self._pending: list[Handle] = []
        self._grad_scratch: dict[int, torch.Tensor] = {}
        self._written: dict[int, dict[int, int]] = {}  # ZeRO-3 scratch bucket -> {start: end} spans written so far
        self._scratch_dtype = params.dtype  # ZeRO-3's gradient scratch: the weights' dtype, like zero 0-2's grads
        self._hook_counts: dict[int, int] = {}

    # -- weights and gradients of one group (uniform over ZeRO levels) ----------------------------------------

    def gather(self, group: int) -> torch.Tensor:
        """Group `group`'s weights, flat: a view of `params` (ZeRO 0-2) or a gathered copy (ZeRO-3)."""
        if self.sharded is not None:
            return self.sharded.gather(group)
        return self.params[self.layout.group_span(group)]

    def prefetch(self, group: int) -> None:
        """Start gathering `group` (ZeRO-3; a no-op otherwise and for groups out of range)."""
        if self.sharded is not None:
            self.sharded.prefetch(group)

    def release(self, group: int) -> None:
        """Free `group`'s gathered weights (ZeRO-3; a no-op otherwise)."""
        if self.sharded is not None:
            self.sharded.release(group)

    def grad_buffer(self, group: int) -> torch.Tensor:
        """Where group `group`'s gradient accumulates (add into it): a view of `grads`, or ZeRO-3 scratch that is
        zero at the start of each micro-step and is reduced (and freed) after `grad_ready(group)`."""
        if self.zero < 3:
            return self.grads[self.layout.group_span(group)]
        b = self.layout.group_bucket[group]
        scratch = self._scratch(group)
        self._zero_unwritten(b)
        self._written[b] = {0: scratch.numel()}
        return scratch[self.layout.group_span_in_bucket(group)]

    def accumulate_grad(self, group: int, offset: int, grad: torch.Tensor) -> None:
        """Add `grad` (any shape) into group `group`'s gradient at element `offset`. At ZeRO-3 the first write of a
        span into this micro-step's scratch is a copy (no zero fill, no read of zeros; spans never written are zeroed
        when the bucket is reduced); at ZeRO 0-2 an add into `grads`."""
        n = grad.numel()
        if self.zero < 3:  # (views in grad's shape: a strided gradient is read in place, never copied first)
            self.grads[self.layout.group_span(group)][offset : offset + n].view(grad.shape).add_(grad)
            return
        b = self.layout.group_bucket[group]
        scratch = self._scratch(group)
        start = self.layout.group_span_in_bucket(group).start + offset
        written = self._written.setdefault(b, {})
        dst = scratch[start : start + n].view(grad.shape)
        if any(s <= start < e for s, e in written.items()):
            dst.add_(grad)
        else:
            dst.copy_(grad)
            written[start] = start + n

    def _scratch(self, group: int) -> torch.Tensor:
        """This micro-step's ZeRO-3 gradient scratch of `group`'s bucket (uninitialised until written)."""
        if self.zero < 3:
            raise RuntimeError("gradient scratch exists at zero=3 only")
        if not self._in_micro:
            raise RuntimeError("at zero=3 gradient buffers exist only inside `with dp.micro_step(...)`")
        b = self.layout.group_bucket[group]
        if self._launched[b]:
            raise RuntimeError(f"group {group}'s bucket was already reduced in this micro-step (grad_ready called)")
        scratch = self._grad_scratch.get(b)
        if scratch is None:
            scratch = torch.empty(self.layout.buckets[b].numel, dtype=self._scratch_dtype, device=self.world.device)
            self._grad_scratch[b] = scratch
            self._written[b] = {}
        return scratch

    def _zero_unwritten(self, b: int) -> None:
        """Zero the spans of bucket b's scratch that no gradient was written into (and the padding)."""
        scratch, reach = self._grad_scratch[b], 0
        for start, end in sorted(self._written.get(b, {}).items()):
            if start > reach:
                scratch[reach:start].zero_()
            reach = max(reach, end)
        if reach < scratch.numel():
            scratch[reach:].zero_()

    # -- micro-steps and reduction -----------------------------------------------------------------------------

    @contextmanager
    def micro_step(self, last: bool = True) -> Iterator[DataParallel]:
        """One forward + backward. Gradients are reduced at its end when `last` (ZeRO 0/1: grads accumulate
        locally over the other micro-steps) and at every micro-step at ZeRO 2/3. Inside, `grad_ready(group)`
        launches a bucket's reduction early, overlapping the rest of backward."""
        if self._in_micro:
            raise RuntimeError("micro_step blocks do not nest")
        self._in_micro = True
        self._reducing = self.zero >= 2 or last
        self._ready = set()
        self._left = [sum(1 for g in b.groups if self.layout.group_sizes[g] > 0) for b in self.layout.buckets]
        self._launched = [False] * len(self.layout.buckets)
        self._hook_counts = {}
        try:
            yield self
        except BaseException:
            self._in_micro = False
            self._pending.clear()
            self._grad_scratch.clear()
            self._written.clear()
            raise
        try:
            if self._reducing:
                for b, launched in enumerate(self._launched):
                    if not launched:
                        self._launch(b)
                for h in self._pending:
                    h.wait()
        finally:
            self._pending.clear()
            self._grad_scratch.clear()
            self._written.clear()
            self._in_micro = False
            self._reducing = False

    def grad_ready(self, group: int) -> None:
        """Group `group`'s gradient is complete for this micro-step: reduce its bucket once all of the bucket's
        groups are ready. Optional: whatever is not launched early is reduced at the end of the micro-step."""
        if not self._in_micro:
            raise RuntimeError("grad_ready is called inside `with dp.micro_step(...)`")
        if group in self._ready:
            raise RuntimeError(
                f"group {group} was marked ready twice in one micro-step: run backward once per micro_step block"
            )
        self._ready.add(group)
        if not self._reducing or self.layout.group_sizes[group] == 0:
            return
        b = self.layout.group_bucket[group]
        self._left[b] -= 1
        if self._left[b] == 0 and not self._launched[b]:
            self._launch(b)
            if self.zero == 3:
                while len(self._pending) > _MAX_INFLIGHT_ZERO3:
                    self._pending.pop(0).wait()

    def skip_reduction(self, group: int) -> None:
        """ZeRO-3: group `group`'s gradient of this micro-step went into the gradient shard another way (a sparse
        embedding gradient, sharded_embedding.py), so its bucket takes part in no reduction. Every rank calls it for
        the same groups; the bucket must hold that group alone and have no gradient scratch."""
        b = self.layout.group_bucket[group]
        if self.zero != 3 or len(self.layout.buckets[b].groups) != 1 or b in self._grad_scratch:
            raise RuntimeError(f"skip_reduction: group {group} needs zero=3, a bucket of its own and no scratch")
        if not self._in_micro:
            raise RuntimeError("skip_reduction is called inside `with dp.micro_step(...)`")
        self._ready.add(group)
        self._launched[b] = True

    def register_grad_hooks(self, groups: Sequence[Sequence[torch.nn.Parameter]]) -> list:
        """Call `grad_ready(g)` from autograd once every parameter of group g has its gradient accumulated
        (post-accumulate-grad hooks; parameters bound with `bind_parameters`). Returns the hook handles."""
        handles = []
        for g, plist in enumerate(groups):
            trainable = [p for p in plist if p.requires_grad]
            for p in trainable:
                handles.append(p.register_post_accumulate_grad_hook(self._hook(g, len(trainable))))
        return handles

    def _hook(self, group: int, count: int):
        def hook(_p: torch.Tensor) -> None:
            if not self._in_micro:
                return
            done = self._hook_counts.get(group, 0) + 1
            self._hook_counts[group] = done
            if done == count:
                self.grad_ready(group)

        return hook

    def _launch(self, b: int) -> None:
        self._launched[b] = True
        bucket = self.layout.buckets[b]
        if bucket.numel == 0:
            return
        scale = self._post_scale
        if self.zero == 0:
            span = self.grads[bucket.span]
            then = (lambda: span.mul_(scale)) if scale != 1 else None
            self._pending.append(all_reduce(self.world, span, self._op, then))
            return
        if self.zero == 3:
            if b in self._grad_scratch:
                self._zero_unwritten(b)
            self._written.pop(b, None)
            full = self._grad_scratch.pop(b, None)
            if full is None:  # no gradient for this bucket on this rank: it still takes part in the collective
                full = torch.zeros(bucket.numel, dtype=self._scratch_dtype, device=self.world.device)
        else:
            full = self.grads[bucket.span]
        own = full.view(self.world.world_size, -1)[self.world.rank]
        dst = self.grad_shard[bucket.shard_span]
        zero = self.zero
        host_grads = self._host_grads

        def then() -> None:
            if host_grads is not None:  # offload_grads (zero 2)
                host_grads.add_(bucket.shard_span, own, alpha=scale)
            elif zero == 1:
                dst.copy_(own)
                if scale != 1:
                    dst.mul_(scale)
            else:
                dst.add_(own, alpha=scale)
            if zero < 3:
                full.zero_()

        self._pending.append(reduce_scatter_(self.world, full, self._op, then))

    # -- optimizer step ---------------------------------------------------------------------------------------

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients (0-d fp32 on the device, no host sync)."""
        if self.zero == 0:
            return torch.linalg.vector_norm(self.grads, dtype=torch.float32)
        sq = self._reduced_shard().square().sum()
        if self.world.world_size > 1:
            tdist.all_reduce(sq)
        return sq.sqrt()

    def step(self, step_fn: StepFn) -> None:
        """Run `step_fn(master, grads, state, work)` on this rank's part (ZeRO 0: everything; else the shard,
        with the reduced gradient shard), then bring the weights the model reads up to date (ZeRO-1/2 all-gather
        them into `params`). E.g. with the fused kernel (surogate.kernels.adamw_step):

            dp.step(lambda m, g, s, w: adamw_step(m, g, s["exp_avg"], s["exp_avg_sq"], lr=lr, ..., work_params=w))

        or plain torch: update m and s in place, then `if w is not None: w.copy_(m)`."""
        if self._in_micro:
            raise RuntimeError("step() is called after the micro_step blocks, not inside one")
        step_fn(self.master, self.grads if self.zero == 0 else self._reduced_shard(), self.state, self.work)
        self._publish()

    def zero_grad(self) -> None:
        """Zero the reduced gradients (ZeRO 1-3 already left the full buffer zeroed after reducing it)."""
        if self.zero == 0:
            self.grads.zero_()
        elif self._host_grads is not None:
            self._host_grads.clear()
        else:
            self.grad_shard.zero_()

    def _reduced_shard(self) -> torch.Tensor:
        """The reduced fp32 gradient shard on the device (offload_grads: one copy from host memory per step)."""
        if self._host_grads is None:
            return self.grad_shard
        return self._host_grads.on_device()

    def _publish(self) -> None:
        """New weights (in `work`, or the master) -> what the model reads: all-gather into params (ZeRO-1/2),
        drop stale gathered layers (ZeRO-3)."""
        if self.zero == 0:
            return
        if self.zero == 3:
            self.sharded.release_all()
            return
        source = self.master if self.work is None else self.work
        handles = []
        for bucket in self.layout.buckets:
            if bucket.numel == 0:
                continue
            full = self.params[bucket.span]
            full.view(self.world.world_size, -1)[self.world.rank].copy_(source[bucket.shard_span])
            handles.append(all_gather_(self.world, full))
        for h in handles:
            h.wait()

    # -- whole-model views and checkpoints --------------------------------------------------------------------

    def full_master(self, dst: int = 0) -> torch.Tensor | None:
        """The fp32 master weights of all groups, unpadded (`layout.to_canonical` order), on the CPU of rank
        `dst` (None on the others). Every rank must call it. Use it to save the model at any ZeRO level."""
        return self._to_canonical(self.master, dst)

    def save_state(self, directory: str | Path, *, gathered: bool = True) -> None:
        """Write master weights + optimizer state (collective: every rank calls it).

        gathered=True: rank 0 writes `optimizer.safetensors`, unpadded, loadable at any world size and ZeRO level.
        gathered=False: every rank writes `rank{r}.safetensors` with its own part (no gather; resume needs the
        same world size, ZeRO level and layout)."""
        from .checkpoint import save_state  # noqa: PLC0415 (checkpoint imports this module)

        save_state(self, Path(directory), gathered=gathered)

    def load_state(self, directory: str | Path) -> None:
        """Read what `save_state` wrote (either form) and refresh `params` from the loaded master."""
        from .checkpoint import load_state  # noqa: PLC0415

        load_state(self, Path(directory))
        if self.work is not None:
            self.work.copy_(self.master)
        self._publish()

    def full_state(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """{"master": ..., **state}: every tensor unpadded in canonical order on rank `dst`'s CPU (None on the
        others), for a trainer that writes its own checkpoint format. Collective: every rank calls it. The state
        must be elementwise (shaped like the master)."""
        out = {"master": self._to_canonical(self.master, dst)}
        for name, t in self.state.items():
            out[name] = self._to_canonical(t, dst)
        return out if self.world.rank == dst else None

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `full_state`, on every rank (each passes the full canonical tensors, e.g. read from the same
        file): keeps this rank's part of the master and state, then refreshes the weights the model reads."""
        for name, t in {"master": self.master, **self.state}.items():
            if name not in tensors:
                raise ValueError(f"optimizer state {name!r} missing (got {sorted(tensors)})")
            self._from_canonical(tensors[name].cpu(), t)
        if self.work is not None:
            self.work.copy_(self.master)
        self._publish()

    def _to_canonical(self, part: torch.Tensor, dst: int) -> torch.Tensor | None:
        """A master-shaped tensor (full at ZeRO 0, shard otherwise) -> canonical order on rank dst's CPU."""
        layout, world = self.layout, self.world
        if self.zero == 0:
            return layout.to_canonical(part).cpu() if world.rank == dst else None
        out = torch.empty(layout.canonical_numel, dtype=part.dtype) if world.rank == dst else None
        for bucket in layout.buckets:
            if bucket.numel == 0:
                continue
            full = torch.empty(bucket.numel, dtype=part.dtype, device=part.device)
            full.view(world.world_size, -1)[world.rank].copy_(part[bucket.shard_span])
            all_gather_(world, full).wait()
            if out is not None:
                host = full.cpu()
                for g in bucket.groups:
                    out[layout.canonical_span(g)] = host[layout.group_span_in_bucket(g)]
        return out

    def _from_canonical(self, canonical: torch.Tensor, out: torch.Tensor) -> None:
        """Canonical (CPU) -> this rank's master-shaped part `out` (full at ZeRO 0, shard otherwise)."""
        layout, world = self.layout, self.world
        if self.zero == 0:
            out.copy_(layout.from_canonical(canonical.to(out.dtype)))
            return
        for bucket in layout.buckets:
            if bucket.numel == 0:
                continue
            full = torch.zeros(bucket.numel, dtype=out.dtype)
            for g in bucket.groups:
                full[layout.group_span_in_bucket(g)] = canonical[layout.canonical_span(g)]
            out[bucket.shard_span].copy_(full.view(world.world_size, -1)[world.rank])


def _check_flat(name: str, t: torch.Tensor, numel: int, device: torch.device) -> None:
    if t.dim() != 1 or t.numel() != numel:
        raise ValueError(f"`{name}` has shape {tuple(t.shape)}, the layout needs a flat ({numel},) buffer")
    if t.device.type != device.type:
        raise ValueError(f"`{name}` is on {t.device}, the world's device is {device}")
