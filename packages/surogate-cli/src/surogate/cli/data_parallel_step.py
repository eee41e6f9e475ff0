"""The training step of N data-parallel ranks (surogate.cli.distributed picks one by zero_level): the window's
token count summed over ranks on the host, gradients reduced bucket by bucket while backward runs (inside the
micro-step and its CUDA graph), and at ZeRO 1-3 the optimizer step on this rank's fp32 shards. What each ZeRO
level keeps where: surogate.cli.distributed's module doc."""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager

import torch

from surogate.kernels import adamw_step, clip_scale

from .grad_ready import GradReadiness
from .step import TrainStep

FAIL_RANK_ENV = "SUROGATE_TEST_FAIL_RANK"


def _check_fail_hook(world, step: int) -> None:
    if os.environ.get(FAIL_RANK_ENV) == str(world.rank) and step >= 2:
        raise RuntimeError(f"{FAIL_RANK_ENV}={world.rank}: rank {world.rank} fails at step {step} (test hook)")


class DataParallelStep(TrainStep):
    """zero 0: the window's token count summed over ranks; on the window's last micro-step each bucket of the flat
    gradient buffers is all-reduced (summed) as soon as backward completes it, inside the micro-step (and its
    CUDA graph); the optimizer step then runs as in one process (every rank updates its full copy identically)."""

    def __init__(self, world, model, groups, **kwargs):
        self.world = world
        super().__init__(model, groups, **kwargs)
        self._readiness = self._overlap()

    def _overlap(self) -> GradReadiness | None:
        self._buckets = AllReduceBuckets(self.world, self.groups)
        return GradReadiness([p for g in self.groups for p in g.params], self._buckets.param_ready)

    def _count_tokens(self, micro_batches) -> int:
        return int(self.world.host_sum(super()._count_tokens(micro_batches)))  # MPI: the GPU is not synced

    def _reduces_in_micro(self, last: bool) -> bool:
        return last  # the gradients accumulate locally over the window's other micro-steps

    @contextmanager
    def _reduction(self, reduce: bool):
        if reduce:
            self._buckets.start()
        with self._readiness.micro_step(reduce):
            yield
        if reduce:
            self._buckets.finish()

    def __call__(self, micro_batches, lr: float, step: int):
        _check_fail_hook(self.world, step)
        loss_sum, valid, norm = super().__call__(micro_batches, lr, step)
        return self.world.sum(loss_sum), valid, norm


class AllReduceBuckets:
    """zero 0: each group's flat gradient buffer cut into spans of whole parameters of about `bucket_numel`
    elements, from the end (backward completes the last parameters first); `param_ready` counts a span's
    parameters down and all-reduces (sums) it when none is left; `finish` launches the rest and waits for all."""

    def __init__(self, world, groups, bucket_numel: int | None = None):
        from surogate.dist.layout import DEFAULT_BUCKET_NUMEL

        limit = bucket_numel or DEFAULT_BUCKET_NUMEL
        self.world = world
        self.spans: list[torch.Tensor] = []
        self.sizes: list[int] = []  # parameters per span
        self.span_of: dict[int, int] = {}  # id(param) -> span
        for g in groups:
            item = g.grad.element_size()
            placed = sorted(((p.grad.data_ptr() - g.grad.data_ptr()) // item, i) for i, p in enumerate(g.params))
            hi, members = None, []
            for offset, i in reversed(placed):
                p = g.params[i]
                if hi is None:
                    hi = offset + p.numel()
                members.append(p)
                if hi - offset >= limit or offset == placed[0][0]:
                    self._add(g.grad[offset:hi], members)
                    hi, members = None, []
        self._left: list[int] = []
        self._launched: list[bool] = []
        self._handles = []

    def _add(self, span: torch.Tensor, members: list) -> None:
        for p in members:
            self.span_of[id(p)] = len(self.spans)
        self.spans.append(span)
        self.sizes.append(len(members))

    def start(self) -> None:
        self._left, self._launched, self._handles = list(self.sizes), [False] * len(self.spans), []

    def param_ready(self, p: torch.Tensor) -> None:
        b = self.span_of[id(p)]
        self._left[b] -= 1
        if self._left[b] == 0:
            self._launch(b)

    def _launch(self, b: int) -> None:
        from surogate.dist._comm import all_reduce

        self._launched[b] = True
        self._handles.append(all_reduce(self.world, self.spans[b], torch.distributed.ReduceOp.SUM))

    def finish(self) -> None:
        for b, launched in enumerate(self._launched):
            if not launched:
                self._launch(b)
        for h in self._handles:
            h.wait()
        self._handles = []


class ZeroStep(DataParallelStep):
    """zero 1: on the window's last micro-step each bucket is reduce-scattered into the groups' fp32 shards as soon
    as backward completes it (inside the micro-step and its graph); norm, clip and AdamW on the shards; the new
    weights all-gathered (collectives: the optimizer step is not captured as a graph)."""

    capture_optimizer = False

    def _overlap(self) -> GradReadiness | None:
        where = {id(p): (g.dp, i) for g in self.groups for i, p in enumerate(g.params)}

        def ready(p):
            dp, i = where[id(p)]
            dp.grad_ready(i)  # one layout group per parameter at zero 1/2

        return GradReadiness([p for g in self.groups for p in g.params], ready)

    @contextmanager
    def _reduction(self, reduce: bool):
        with ExitStack() as stack:
            if reduce:  # entered first, left last: launches what is left and waits, after backward
                for g in self.groups:
                    stack.enter_context(g.dp.micro_step(last=True))
            stack.enter_context(self._readiness.micro_step(reduce))
            yield

    def _optimizer_step(self) -> None:
        squares = [g.dp.grad_norm() ** 2 for g in self.groups]
        norm = torch.stack(squares).sum().sqrt()
        scale = clip_scale(norm, self.max_grad_norm) if self.max_grad_norm > 0 else None
        for g in self.groups:
            def adamw(master, grads, state, work, wd=g.weight_decay):
                adamw_step(master, grads, state["exp_avg"], state["exp_avg_sq"], lr=self.lr, beta1=self.betas[0],
                           beta2=self.betas[1], eps=self.eps, weight_decay=wd, step=self.step, grad_scale=scale,
                           work_params=work, stochastic_rounding=self.stochastic_rounding, seed=self.seed)

            g.dp.step(adamw)
            g.dp.zero_grad()
        self.grad_norm.copy_(norm)


class Zero2Step(ZeroStep):
    """zero 2: every micro-step reduce-scatters its gradients into the fp32 shards (adding), bucket by bucket as
    backward completes them, inside the micro-step and its graph; the full buffer is zeroed for the next one.
    offload_grads (the shard in host memory, summed through one-chunk device buffers; which spans are copied in
    is decided in Python per micro-step, so not captured): after each micro-step's replay, outside its graph,
    without overlap with backward. The rest is zero 1's."""

    def _offloaded(self) -> bool:
        return any(g.dp.offload_grads for g in self.groups)

    def _reduces_in_micro(self, last: bool) -> bool:
        return not self._offloaded()

    @contextmanager
    def _micro_scope(self):
        with ExitStack() as stack:
            if self._offloaded():
                for g in self.groups:
                    stack.enter_context(g.dp.micro_step(last=True))
            yield


class Zero3Step(ZeroStep):
    """zero 3: every micro-step gathers each part's weights ahead of use (the model's provider, GatheredParameters)
    and reduce-scatters its gradients as backward completes them, all inside the micro-step, so inside its CUDA
    graph: the Python that decides what to gather, prefetch and reduce runs once, at capture; replays repeat the
    same collectives and kernels on the same buffers."""

    def __init__(self, world, model, groups, *, gathered, **kwargs):
        super().__init__(world, model, groups, **kwargs)
        self.gathered = gathered

    def _overlap(self) -> GradReadiness | None:
        return None  # the provider knows when a layer's gradients are complete

    def _reduces_in_micro(self, last: bool) -> bool:
        return True

    @contextmanager
    def _reduction(self, reduce: bool):
        with ExitStack() as stack:
            for g in self.groups:  # entered first, left last: the reductions are launched and waited for
                stack.enter_context(g.dp.micro_step(last=True))
            stack.enter_context(self.gathered.scope())
            yield
