"""Trainable parameters on flat buffers, with their optimizer state: what TrainStep updates.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from surogate.kernels import adamw_step
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

    g = groups[0]  # a ParamGroup, or a ZeRO ShardedGroup (offload_method None)
    what = "fp32 AdamW states" if g.optimizer == "adamw" else "8-bit AdamW states"
    text = f"trainer memory ({what}): device: {line('device')}"
    if total["host"]:
        method = f", reached {g.offload_method.replace('_', '-')}" if g.offload_method else ""
        text += f"; pinned host: {line('host')}{method}"
    return total, text
