"""The training step: trainable parameters on flat buffers, one micro-step and one optimizer step, each optionally
captured as a CUDA graph and replayed.

Why flat buffers: the fused AdamW, the grad norm and zeroing the grads are then one launch each per step, whatever
the number of tensors, and data parallelism reduces one buffer. Trainable parameters become views into a flat work
buffer (the model dtype) and their `.grad` views into a flat grad buffer, so autograd accumulates micro-batch grads
in place. An fp32 master copy exists only when the work dtype is not fp32.

Why CUDA graphs: a Numba launch costs 40-140 us of Python, so an eager step is CPU-bound. Shapes are static
([micro_batch, seq_len] rows), the loss normaliser, learning rate and step count live in device tensors that are
refilled before each replay, and nothing inside the step reads a value back to the host. Packed documents change
the length of cu_seqlens (FlashAttention varlen); it is padded with empty documents to a power-of-two bucket and
one micro-step graph is captured per bucket seen (all sharing one memory pool; they never run concurrently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from surogate.kernels import adamw_step, clip_scale, global_grad_norm


@dataclass
class ParamGroup:
    """Parameters sharing a weight decay, as views into flat buffers."""

    params: list[torch.nn.Parameter]
    weight_decay: float
    work: torch.Tensor = field(init=False)  # flat, model dtype; the parameters are views into it
    grad: torch.Tensor = field(init=False)  # flat, model dtype; the parameters' .grad are views into it
    master: torch.Tensor = field(init=False)  # flat fp32; `work` itself when the model dtype is fp32
    exp_avg: torch.Tensor = field(init=False)
    exp_avg_sq: torch.Tensor = field(init=False)

    def __post_init__(self):
        first = self.params[0]
        total = sum(p.numel() for p in self.params)
        self.work = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros(total, dtype=first.dtype, device=first.device)
        offset = 0
        for p in self.params:
            n = p.numel()
            self.work[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.work[offset : offset + n].view(p.shape)
            p.grad = self.grad[offset : offset + n].view(p.shape)
            offset += n
        self.master = self.work if first.dtype == torch.float32 else self.work.float()
        self.exp_avg = torch.zeros(total, dtype=torch.float32, device=first.device)
        self.exp_avg_sq = torch.zeros(total, dtype=torch.float32, device=first.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"master": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.state_dict().items():
            if state[name].shape != t.shape:
                raise ValueError(f"optimizer state `{name}` has {state[name].numel()} values, expected {t.numel()}")
            t.copy_(state[name])
        if self.master is not self.work:
            self.work.copy_(self.master)


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[ParamGroup]:
    """Weight decay on matrices; none on vectors (norm weights, biases). Empty groups are left out."""
    decay = [p for _, p in named_params if p.dim() >= 2]
    no_decay = [p for _, p in named_params if p.dim() < 2]
    groups = []
    if decay:
        groups.append(ParamGroup(decay, weight_decay))
    if no_decay:
        groups.append(ParamGroup(no_decay, 0.0))
    return groups


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
    """

    def __init__(self, model, groups: list[ParamGroup], *, micro_batch: int, seq_len: int, betas=(0.9, 0.999),
                 eps: float = 1e-8, max_grad_norm: float = 1.0, cuda_graphs: bool = True,
                 stochastic_rounding: bool = False, seed: int = 0):
        self.model = model
        self.groups = groups
        self.betas, self.eps, self.max_grad_norm = betas, eps, max_grad_norm
        self.stochastic_rounding, self.seed = stochastic_rounding, seed
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
        self._micro_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._optimizer_graph: torch.cuda.CUDAGraph | None = None
        self._pool = None

    # ------------------------------------------------------------------------------------------ the two steps
    def _micro_step(self, cu_seqlens: torch.Tensor | None) -> None:
        loss_sum, _ = self.model.loss_sum(self.input_ids, self.labels, self.position_ids, cu_seqlens=cu_seqlens)
        (loss_sum * self.inv_tokens).backward()
        self.loss_sum += loss_sum.detach()

    def _optimizer_step(self) -> None:
        squares = [global_grad_norm(g.grad) ** 2 for g in self.groups]
        norm = torch.stack(squares).sum().sqrt() if len(squares) > 1 else squares[0].sqrt()
        scale = clip_scale(norm, self.max_grad_norm) if self.max_grad_norm > 0 else None
        for g in self.groups:
            adamw_step(g.master, g.grad, g.exp_avg, g.exp_avg_sq, lr=self.lr, beta1=self.betas[0],
                       beta2=self.betas[1], eps=self.eps, weight_decay=g.weight_decay, step=self.step,
                       grad_scale=scale, work_params=None if g.master is g.work else g.work,
                       stochastic_rounding=self.stochastic_rounding, seed=self.seed)
            g.grad.zero_()
        self.grad_norm.copy_(norm)

    # ------------------------------------------------------------------------------------------ graphs
    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (compiles Numba kernels, lets autograd and cuBLAS set up), then capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        snapshot = [(g.grad.clone(), g.master.clone(), g.exp_avg.clone(), g.exp_avg_sq.clone(), g.work.clone())
                    for g in self.groups]
        loss, norm = self.loss_sum.clone(), self.grad_norm.clone()
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        # the warm-up must leave no trace: restore every buffer it touched
        for g, (grad, master, m, v, work) in zip(self.groups, snapshot, strict=True):
            g.grad.copy_(grad), g.master.copy_(master), g.exp_avg.copy_(m), g.exp_avg_sq.copy_(v), g.work.copy_(work)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        self.loss_sum.copy_(loss), self.grad_norm.copy_(norm)
        return graph

    def _run_micro(self, bucket: int) -> None:
        cu = self.cu_seqlens.get(bucket)
        if not self.cuda_graphs:
            self._micro_step(cu)
            return
        graph = self._micro_graphs.get(bucket)
        if graph is None:
            graph = self._micro_graphs[bucket] = self._capture(lambda: self._micro_step(cu))
        graph.replay()

    # ------------------------------------------------------------------------------------------ data-parallel hooks
    # (surogate.cli.distributed overrides these; in one process they count locally and reduce nothing)
    capture_optimizer = True  # False when the optimizer step runs collectives (ZeRO): it then runs eagerly

    def _count_tokens(self, micro_batches: list[dict[str, torch.Tensor]]) -> int:
        """Trained tokens of the step's window (the loss normaliser), counted on the host."""
        return sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)

    def _reduce_grads(self) -> None:
        """Between the last micro-step and the optimizer step, outside any captured graph."""

    # ------------------------------------------------------------------------------------------ the public step
    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, step: int):
        """micro_batches: dicts of CPU tensors input_ids, labels, position_ids [micro_batch, seq_len].
        Returns (loss_sum, valid_tokens, grad_norm): device tensors for the loss and norm (read them a step later
        to avoid a sync), the token count as a Python int (counted on the host)."""
        valid = self._count_tokens(micro_batches)
        self.inv_tokens.fill_(1.0 / max(valid, 1))
        self.loss_sum.zero_()
        for mb in micro_batches:
            self.input_ids.copy_(mb["input_ids"], non_blocking=True)
            self.labels.copy_(mb["labels"], non_blocking=True)
            self.position_ids.copy_(mb["position_ids"], non_blocking=True)
            bucket = 0
            if self.device.type == "cuda":
                cu = cu_seqlens_bucket(mb["position_ids"])
                bucket = cu.numel()
                if bucket not in self.cu_seqlens:
                    self.cu_seqlens[bucket] = torch.empty(bucket, dtype=torch.int32, device=self.device)
                self.cu_seqlens[bucket].copy_(cu, non_blocking=True)
            self._run_micro(bucket)
        self._reduce_grads()
        self.lr.fill_(lr)
        self.step.fill_(step)
        if self.cuda_graphs and self.capture_optimizer:
            if self._optimizer_graph is None:
                self._optimizer_graph = self._capture(self._optimizer_step)
            self._optimizer_graph.replay()
        else:
            self._optimizer_step()
        return self.loss_sum, valid, self.grad_norm
