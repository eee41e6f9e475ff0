"""The training step: trainable parameters on flat buffers, one micro-step and one optimizer step, each optionally
captured as a CUDA graph and replayed.

Why flat buffers: the fused AdamW, the grad norm and zeroing the grads are then one launch each per step, whatever
the number of tensors, and data parallelism reduces one buffer. Trainable parameters become views into a flat work
buffer (the model dtype) and their `.grad` views into a flat grad buffer, so autograd accumulates micro-batch grads
in place. An fp32 master copy exists only when the work dtype is not fp32.

Optimizer state per group: `adamw` keeps fp32 exp_avg / exp_avg_sq (8 bytes a parameter); `adamw_8bit` keeps
blockwise 8-bit codes with one fp32 absmax per 2048 parameters and per moment (surogate.quant.optim.adamw8bit,
2 bytes a parameter). `offload_optimizer` puts those states, `offload_master` the fp32 master, in pinned host memory
(surogate.cli.offload: the kernel reads it zero-copy, or it is streamed through the GPU in double-buffered chunks);
the work weights and grads stay on the device. Every variant updates the same values as the resident fp32-or-8-bit
update, bit for bit (the update is elementwise, 8-bit per 2048-block; chunks are multiples of 2048), except
stochastic rounding under `stream`, which draws its bits per chunk.

Why CUDA graphs: a Numba launch costs 40-140 us of Python, so an eager step is CPU-bound. Shapes are static
([micro_batch, seq_len] rows), the loss normaliser, learning rate and step count live in device tensors that are
refilled before each replay, and nothing inside the step reads a value back to the host. Packed documents change
the length of cu_seqlens (FlashAttention varlen); it is padded with empty documents to a power-of-two bucket and
one micro-step graph is captured per bucket seen (all sharing one memory pool; they never run concurrently).
The first run of each graph is eager, on a side stream: it is the warm-up torch needs before a capture (Numba
compiles, autograd and cuBLAS set up) and also real work, so nothing has to be snapshotted and restored (a snapshot
of the optimizer buffers would double their memory). The graph is captured on the second run, then replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from surogate.kernels import adamw_step, clip_scale, global_grad_norm
from surogate.quant.optim.adamw8bit import (
    BLOCK,
    M_ZERO_CODE,
    V_ZERO_CODE,
    AdamW8bitState,
    hyper_parameters,
    reference_step,
    step_kernel,
)

from .offload import CHUNK, Buffer, Streamer

OPTIMIZERS = ("adamw", "adamw_8bit")
OFFLOAD_METHODS = ("zero_copy", "stream")


@dataclass
class ParamGroup:
    """Parameters sharing a weight decay, as views into flat buffers, with their optimizer buffers.

    optimizer: adamw (fp32 states) or adamw_8bit. offload_master / offload_optimizer: the fp32 master / the states in
    pinned host memory, reached by `offload_method` zero_copy or stream (chunks of `chunk` parameters)."""

    params: list[torch.nn.Parameter]
    weight_decay: float
    optimizer: str = "adamw"
    offload_master: bool = False
    offload_optimizer: bool = False
    offload_method: str = "zero_copy"
    chunk: int = CHUNK
    work: torch.Tensor = field(init=False)  # flat, model dtype; the parameters are views into it
    grad: torch.Tensor = field(init=False)  # flat, model dtype; the parameters' .grad are views into it
    buffers: dict[str, Buffer] = field(init=False)  # master, then the optimizer states
    streamer: Streamer | None = field(init=False, default=None)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.offload_method not in OFFLOAD_METHODS:
            raise ValueError(f"offload_method must be one of {', '.join(OFFLOAD_METHODS)}, got {self.offload_method!r}")
        first = self.params[0]
        device = first.device
        total = sum(p.numel() for p in self.params)
        self.work = torch.empty(total, dtype=first.dtype, device=device)
        self.grad = torch.zeros(total, dtype=first.dtype, device=device)
        offset = 0
        for p in self.params:
            n = p.numel()
            self.work[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.work[offset : offset + n].view(p.shape)
            p.grad = self.grad[offset : offset + n].view(p.shape)
            offset += n
        if first.dtype == torch.float32:  # the work weights are their own master: nothing separate to offload
            self.offload_master = False
            self.buffers = {"master": Buffer(self.work)}
        else:
            self.buffers = {"master": Buffer.allocate(total, torch.float32, device, offload=self.offload_master)}
            _copy_in_chunks(self.buffers["master"].data, self.work)
        off = self.offload_optimizer
        if self.optimizer == "adamw":
            for name in ("exp_avg", "exp_avg_sq"):
                self.buffers[name] = Buffer.allocate(total, torch.float32, device, offload=off)
        else:
            blocks = -(-total // BLOCK)
            self.buffers["m_codes"] = Buffer.allocate(total, torch.uint8, device, offload=off, fill=M_ZERO_CODE)
            self.buffers["v_codes"] = Buffer.allocate(total, torch.uint8, device, offload=off, fill=V_ZERO_CODE)
            for name in ("m_absmax", "v_absmax"):
                self.buffers[name] = Buffer.allocate(blocks, torch.float32, device, offload=off, per=BLOCK)
        offloaded = [b for b in self.buffers.values() if b.offloaded]
        if offloaded and self.offload_method == "stream":
            self.streamer = Streamer(offloaded, total, device, self.chunk)

    # ------------------------------------------------------------------------------------------ buffers
    @property
    def master(self) -> torch.Tensor:
        """The fp32 master weights (`work` itself for fp32 models; a host tensor when offloaded)."""
        return self.buffers["master"].data

    @property
    def exp_avg(self) -> torch.Tensor:
        return self.buffers["exp_avg"].data

    @property
    def exp_avg_sq(self) -> torch.Tensor:
        return self.buffers["exp_avg_sq"].data

    def memory(self) -> dict[str, dict[str, int]]:
        """Bytes per kind ({"device": {...}, "host": {...}}): weights, grads, master, optimizer state, staging."""
        out = {"device": {}, "host": {}}

        def add(where, kind, n):
            out[where][kind] = out[where].get(kind, 0) + n

        add("device", "weights", self.work.numel() * self.work.element_size())
        add("device", "grads", self.grad.numel() * self.grad.element_size())
        for name, buf in self.buffers.items():
            if name == "master" and buf.data is self.work:
                continue
            add("host" if buf.offloaded else "device", "master" if name == "master" else "optimizer", buf.nbytes)
        if self.streamer is not None:
            add("device", "staging", self.streamer.nbytes)
        return out

    def _sync(self) -> None:
        """Offloaded buffers are written by the device asynchronously: wait before the host touches them."""
        if self.work.is_cuda and any(b.offloaded for b in self.buffers.values()):
            torch.cuda.synchronize(self.work.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._sync()
        return {name: buf.data for name, buf in self.buffers.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._sync()
        for name, t in self.state_dict().items():
            if name not in state:
                raise ValueError(f"optimizer state `{name}` is missing (the checkpoint holds {', '.join(state)})")
            if state[name].shape != t.shape:
                raise ValueError(f"optimizer state `{name}` has {state[name].numel()} values, expected {t.numel()}")
            t.copy_(state[name])
        if self.master is not self.work:
            _copy_in_chunks(self.work, self.master)

    # ------------------------------------------------------------------------------------------ the update
    def update(self, *, lr: torch.Tensor, step: torch.Tensor, grad_scale: torch.Tensor | None, consts: dict,
               stochastic_rounding: bool = False, seed: int = 0) -> None:
        """One AdamW step of this group (device ops only: capturable). consts: 0-d device tensors beta1, beta2, eps
        and one (for the 8-bit hyper-parameter vector)."""
        hyper = None
        if self.optimizer == "adamw_8bit":
            hyper = hyper_parameters(lr=lr, beta1=consts["beta1"], beta2=consts["beta2"], eps=consts["eps"],
                                     weight_decay=consts["wd"][self.weight_decay], step=step,
                                     grad_scale=consts["one"] if grad_scale is None else grad_scale,
                                     device=self.work.device)

        def run(a: int, b: int, views: dict[str, torch.Tensor]) -> None:
            master = views["master"]
            work = None if self.master is self.work else self.work[a:b]
            if self.optimizer == "adamw":
                chunk_seed = seed if (a == 0 or not stochastic_rounding) else (seed + a * 0x9E3779B1) % 2**63
                adamw_step(master, self.grad[a:b], views["exp_avg"], views["exp_avg_sq"], lr=lr,
                           beta1=consts["betas"][0], beta2=consts["betas"][1], eps=consts["eps_value"],
                           weight_decay=self.weight_decay, step=step, grad_scale=grad_scale, work_params=work,
                           stochastic_rounding=stochastic_rounding, seed=chunk_seed)
            else:
                state = AdamW8bitState(views["m_codes"], views["v_codes"], views["m_absmax"], views["v_absmax"])
                (step_kernel if master.is_cuda else reference_step)(master, self.grad[a:b], state, hyper, work)

        n = self.work.numel()
        if self.streamer is None:  # resident, or offloaded and reached zero-copy: one update over everything
            run(0, n, {name: buf.alias if buf.offloaded else buf.data for name, buf in self.buffers.items()})
            return
        names = list(self.buffers)
        streamed = [name for name in names if self.buffers[name].offloaded]

        def chunk(a: int, b: int, staged: list[torch.Tensor]) -> None:
            views = dict(zip(streamed, staged, strict=True))
            for name in names:
                if name not in views:
                    buf = self.buffers[name]
                    views[name] = buf.data[slice(*buf.span(a, b))]
            run(a, b, views)

        self.streamer.run(chunk)


def _copy_in_chunks(dst: torch.Tensor, src: torch.Tensor, chunk: int = CHUNK) -> None:
    """dst.copy_(src) for flat buffers, a chunk at a time: a copy across devices that also changes the dtype makes a
    temporary of the whole source (33 GB for 8B fp32 master weights) otherwise."""
    for a in range(0, dst.numel(), chunk):
        dst[a : a + chunk].copy_(src[a : a + chunk])


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], weight_decay: float, **options
                 ) -> list[ParamGroup]:
    """Weight decay on matrices; none on vectors (norm weights, biases). Empty groups are left out.
    options: ParamGroup's optimizer, offload_master, offload_optimizer, offload_method, chunk."""
    decay = [p for _, p in named_params if p.dim() >= 2]
    no_decay = [p for _, p in named_params if p.dim() < 2]
    groups = []
    if decay:
        groups.append(ParamGroup(decay, weight_decay, **options))
    if no_decay:
        groups.append(ParamGroup(no_decay, 0.0, **options))
    return groups


def memory_report(groups: list[ParamGroup]) -> tuple[dict[str, dict[str, int]], str]:
    """Bytes per place and kind over all groups, and one line for the run log."""
    total = {"device": {}, "host": {}}
    for g in groups:
        for where, kinds in g.memory().items():
            for kind, n in kinds.items():
                total[where][kind] = total[where].get(kind, 0) + n

    def size(n):
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    def line(where):
        kinds = total[where]
        return ", ".join(f"{k} {size(v)}" for k, v in kinds.items()) + f" (total {size(sum(kinds.values()))})"

    g = groups[0]
    what = "fp32 AdamW states" if g.optimizer == "adamw" else "8-bit AdamW states"
    text = f"trainer memory ({what}): device: {line('device')}"
    if total["host"]:
        text += f"; pinned host: {line('host')}, reached {g.offload_method.replace('_', '-')}"
    return total, text


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
        self._micro_graphs: dict[int, torch.cuda.CUDAGraph | None] = {}  # None: warmed up, not captured yet
        self._optimizer_graph: torch.cuda.CUDAGraph | None = None
        self._optimizer_warm = False
        self._pool = None

    # ------------------------------------------------------------------------------------------ the two steps
    def _micro_step(self, cu_seqlens: torch.Tensor | None, rows_are_documents: bool = False) -> None:
        position_ids = None if rows_are_documents else self.position_ids  # None: 0..seq-1 in every row
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

    def _run_micro(self, bucket: int) -> None:
        cu, rows = self.cu_seqlens.get(bucket), bucket == ROWS_BUCKET
        if not self.cuda_graphs:
            self._micro_step(cu, rows)
            return
        if bucket not in self._micro_graphs:
            self._warm_up(lambda: self._micro_step(cu, rows))
            self._micro_graphs[bucket] = None
            return
        if self._micro_graphs[bucket] is None:
            self._micro_graphs[bucket] = self._capture(lambda: self._micro_step(cu, rows))
        self._micro_graphs[bucket].replay()

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
        for mb in micro_batches:
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
                self._run_micro(bucket)
        self._reduce_grads()
        self.lr.fill_(lr)
        self.step.fill_(step)
        self._run_optimizer()
        return self.loss_sum, valid, self.grad_norm
