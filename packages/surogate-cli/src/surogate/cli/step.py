"""The training step: one micro-step (forward + backward into the flat grads) and one optimizer step over the
trainable parameters' flat buffers (surogate.cli.param_group), each optionally captured as a CUDA graph and replayed.

Why CUDA graphs: a Numba launch costs 40-140 us of Python, so an eager step is CPU-bound. Shapes are static
([micro_batch, seq_len] rows), the loss normaliser, learning rate and step count live in device tensors that are
refilled before each replay, and nothing inside the step reads a value back to the host. Packed documents change
the length of cu_seqlens (FlashAttention varlen); it is padded with empty documents to a power-of-two bucket and
one micro-step graph is captured per bucket seen (all sharing one memory pool; they never run concurrently); rows
that are one document each have their own bucket (no cu_seqlens: dense causal attention per row).
The first run of each graph is eager, on a side stream: it is the warm-up torch needs before a capture (Numba
compiles, autograd and cuBLAS set up) and also real work, so nothing has to be snapshotted and restored (a snapshot
of the optimizer buffers would double their memory). The graph is captured on the second run, then replayed.
(fp8-hybrid: micro-steps stay eager until the first optimizer step has calibrated the delayed scales.)
Data-parallel subclasses (surogate.cli.distributed) reduce gradients inside a micro-step (`_reduction`): the one
that reduces has a graph of its own, keyed (bucket, True), with the NCCL collectives in it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from surogate.kernels import clip_scale, global_grad_norm

from .param_group import ParamGroup

ROWS_BUCKET = 1  # the micro-step graph of rows that are one document each (cu_seqlens buckets are >= 2 long)


def rows_are_documents(position_ids: torch.Tensor) -> bool:
    """[batch, seq] CPU position ids: True when every row is 0..seq-1, i.e. one causal document per row. The model
    then gets no position ids and no cu_seqlens and may run dense causal attention per row (cuDNN on the H100, ~1.5x
    FlashAttention-2 varlen's speed); packed rows keep FlashAttention varlen with document masking."""
    seq = position_ids.shape[-1]
    return bool(torch.equal(position_ids, torch.arange(seq, dtype=position_ids.dtype).expand_as(position_ids)))


def cu_seqlens_bucket(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] CPU position ids -> int32 cu_seqlens over the flattened tokens, padded with empty documents
    (repeats of the token count) to a power-of-two length, so that few distinct shapes exist."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
    n = idx.numel() + 1
    size = 1 << max(1, (n - 1).bit_length())
    cu = torch.full((size,), position_ids.numel(), dtype=torch.int32)
    cu[: idx.numel()] = idx.to(torch.int32)
    return cu


class TrainStep:
    """Runs one optimizer step over a window of micro-batches: forward + backward of each (accumulating grads),
    then global grad norm, clip scale and fused AdamW on the device.

    `model` must offer loss_sum(input_ids, labels, position_ids, cu_seqlens=...) -> (loss_sum, n_valid).
    `log` (optional) receives one-line notes, e.g. why the optimizer step runs without a CUDA graph.
    """

    def __init__(self, model, groups: list[ParamGroup], *, micro_batch: int, seq_len: int, betas=(0.9, 0.999),
                 eps: float = 1e-8, max_grad_norm: float = 1.0, cuda_graphs: bool = True,
                 stochastic_rounding: bool = False, seed: int = 0, log: Callable[[str], None] | None = None):
        self.model = model
        self.groups = groups
        self.betas, self.eps, self.max_grad_norm = betas, eps, max_grad_norm
        self.stochastic_rounding, self.seed = stochastic_rounding, seed
        self.log = log or (lambda text: None)
        device = groups[0].work.device
        self.device = device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        shape = (micro_batch, seq_len)
        self.input_ids = torch.zeros(shape, dtype=torch.int64, device=device)
        self.labels = torch.full(shape, -100, dtype=torch.int64, device=device)
        self.position_ids = torch.zeros(shape, dtype=torch.int64, device=device)
        self.cu_seqlens: dict[int, torch.Tensor] = {}
        self.inv_tokens = torch.zeros((), dtype=torch.float32, device=device)  # 1 / valid tokens of the window
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.step = torch.zeros((), dtype=torch.float32, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float32, device=device)

        def scalar(v):
            return torch.tensor(float(v), dtype=torch.float32, device=device)

        wds = {getattr(g, "weight_decay", 0.0) for g in groups}
        self._consts = {"beta1": scalar(betas[0]), "beta2": scalar(betas[1]), "eps": scalar(eps), "one": scalar(1.0),
                        "wd": {wd: scalar(wd) for wd in wds}, "betas": betas, "eps_value": eps}
        # (cu_seqlens bucket, reduces) -> graph; None: warmed up, not captured yet
        self._micro_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph | None] = {}
        self._optimizer_graph: torch.cuda.CUDAGraph | None = None
        self._optimizer_warm = False
        self._pool = None

    # ------------------------------------------------------------------------------------------ the two steps
    def _micro_step(self, cu_seqlens: torch.Tensor | None, rows_are_documents: bool = False,
                    reduce: bool = False) -> None:
        position_ids = None if rows_are_documents else self.position_ids  # None: 0..seq-1 in every row
        with self._reduction(reduce):
            loss_sum, _ = self.model.loss_sum(self.input_ids, self.labels, position_ids, cu_seqlens=cu_seqlens)
            (loss_sum * self.inv_tokens).backward()
        self.loss_sum += loss_sum.detach()

    def _optimizer_step(self) -> None:
        squares = [global_grad_norm(g.grad) ** 2 for g in self.groups]
        norm = torch.stack(squares).sum().sqrt() if len(squares) > 1 else squares[0].sqrt()
        scale = clip_scale(norm, self.max_grad_norm) if self.max_grad_norm > 0 else None
        for g in self.groups:
            g.update(lr=self.lr, step=self.step, grad_scale=scale, consts=self._consts,
                     stochastic_rounding=self.stochastic_rounding, seed=self.seed)
            g.grad.zero_()
        self.grad_norm.copy_(norm)

    # ------------------------------------------------------------------------------------------ graphs
    @staticmethod
    def _warm_up(fn) -> None:
        """The first run of a graph's work: eager, on a side stream (torch's rule before a capture); real work."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        """Capture fn (it does not run: replay it)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        return graph

    def release_graphs(self) -> None:
        """Free the captured graphs (a later step captures again). Call it before the process group is destroyed:
        NCCL's communicator teardown waits for graphs that captured its collectives (seen as a hang at exit)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        for graph in [*self._micro_graphs.values(), self._optimizer_graph]:
            if graph is not None:
                graph.reset()
        self._micro_graphs.clear()
        self._optimizer_graph = None

    def _run_micro(self, bucket: int, reduce: bool = False) -> None:
        """One micro-step of a cu_seqlens bucket; `reduce`: it also reduces the gradients (data parallel), a graph
        of its own."""
        cu, rows = self.cu_seqlens.get(bucket), bucket == ROWS_BUCKET
        if not self.cuda_graphs:
            self._micro_step(cu, rows, reduce)
            return
        key = (bucket, reduce)
        if key not in self._micro_graphs:
            self._warm_up(lambda: self._micro_step(cu, rows, reduce))
            self._micro_graphs[key] = None
            return
        if self._micro_graphs[key] is None:
            if not self.model.recipe.calibrated:  # fp8 scales still just in time: capture the delayed path later
                self._warm_up(lambda: self._micro_step(cu, rows, reduce))
                return
            self._micro_graphs[key] = self._capture(lambda: self._micro_step(cu, rows, reduce))
        self._micro_graphs[key].replay()

    def _run_optimizer(self) -> None:
        if not (self.cuda_graphs and self.capture_optimizer):
            self._optimizer_step()
            return
        if not self._optimizer_warm:
            self._warm_up(self._optimizer_step)
            self._optimizer_warm = True
            return
        if self._optimizer_graph is None:
            try:
                self._optimizer_graph = self._capture(self._optimizer_step)
            except RuntimeError as e:  # e.g. a copy this torch build cannot capture: run eagerly, say why
                torch.cuda.synchronize()
                self.capture_optimizer = False
                self.log(f"use_cuda_graphs: the optimizer step could not be captured ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); it runs eagerly from now on")
                self._optimizer_step()
                return
        self._optimizer_graph.replay()

    # ------------------------------------------------------------------------------------------ data-parallel hooks
    # (surogate.cli.distributed overrides these; in one process they count locally and reduce nothing)
    capture_optimizer = True  # False when the optimizer step runs collectives (ZeRO): it then runs eagerly

    def _count_tokens(self, micro_batches: list[dict[str, torch.Tensor]]) -> int:
        """Trained tokens of the step's window (the loss normaliser), counted on the host."""
        return sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)

    def _reduces_in_micro(self, last: bool) -> bool:
        """Whether this micro-step (`last` of the window or not) reduces gradients inside itself."""
        return False

    def _reduction(self, reduce: bool):
        """A context around a micro-step's forward + backward, inside its captured graph: data-parallel steps start
        bucket reductions from it as backward completes the gradients, and wait for them at its end."""
        return nullcontext()

    def _reduce_grads(self) -> None:
        """Between the last micro-step and the optimizer step, outside any captured graph."""

    def _micro_scope(self):
        """A context around each micro-step (its eager run, warm-up or graph replay), outside any captured graph:
        ZeRO-2/3 reduce-scatter the micro-step's gradients as it ends, ZeRO-3 gathers weights inside it."""
        return nullcontext()

    # ------------------------------------------------------------------------------------------ the public step
    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, step: int):
        """micro_batches: dicts of CPU tensors input_ids, labels, position_ids [micro_batch, seq_len].
        Returns (loss_sum, valid_tokens, grad_norm): device tensors for the loss and norm (read them a step later
        to avoid a sync), the token count as a Python int (counted on the host)."""
        valid = self._count_tokens(micro_batches)
        self.inv_tokens.fill_(1.0 / max(valid, 1))
        self.loss_sum.zero_()
        for i, mb in enumerate(micro_batches):
            reduce = self._reduces_in_micro(last=i == len(micro_batches) - 1)
            self.input_ids.copy_(mb["input_ids"], non_blocking=True)
            self.labels.copy_(mb["labels"], non_blocking=True)
            self.position_ids.copy_(mb["position_ids"], non_blocking=True)
            bucket = 0
            if self.device.type == "cuda" and rows_are_documents(mb["position_ids"]):
                bucket = ROWS_BUCKET
            elif self.device.type == "cuda":
                cu = cu_seqlens_bucket(mb["position_ids"])
                bucket = cu.numel()
                if bucket not in self.cu_seqlens:
                    self.cu_seqlens[bucket] = torch.empty(bucket, dtype=torch.int32, device=self.device)
                self.cu_seqlens[bucket].copy_(cu, non_blocking=True)
            with self._micro_scope():
                self._run_micro(bucket, reduce)
        self._reduce_grads()
        self.lr.fill_(lr)
        self.step.fill_(step)
        self._run_optimizer()
        return self.loss_sum, valid, self.grad_norm
