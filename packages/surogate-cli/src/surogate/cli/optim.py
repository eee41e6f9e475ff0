"""The optimizer over flat buffers, and the learning-rate schedule.

Trainable parameters are laid out in two flat groups: `decay` (matrices: weights, embeddings, LoRA A/B) and
`no_decay` (norm weights, biases). Per group:
  master      fp32 [n]   the weights the optimizer updates (fp32 parameters are views into it: zero copy)
  work        bf16 [n]   only when the model computes in bf16: the parameters are views into it, and the optimizer
                         writes it from the new master (round to nearest even) in the same launch
  grads       [n]        in the parameters' dtype; every parameter's .grad is a view into it, so autograd
                         accumulates micro-batches in place and the optimizer reads one buffer
  state       adamw: exp_avg, exp_avg_sq fp32 [n];  adamw_8bit: surogate.quant's blockwise 8-bit codes + absmax
One optimizer step is one surogate.kernels.adamw_step (or surogate.quant adamw8bit_step) launch per group, with the
clip factor applied inside it (grad_scale): no pass over the gradients to scale them.
"""

from __future__ import annotations

import math

import torch

from .config import Config


def lr_at(step: int, cfg: Config, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    warmup: base * (step + 1) / warmup;  then over the main phase (progress p from 0 to 1):
    linear base -> final, cosine final + (base - final) * (1 + cos(pi p)) / 2, wsd and constant stay at base;
    cooldown (last cooldown_steps): from the main phase's last value down to final as 1 - sqrt(progress).
    final = base * final_lr_fraction."""
    base = cfg.learning_rate
    final = base * cfg.final_lr_fraction
    warmup = warmup_steps(cfg, max_steps)
    cooldown = min(cfg.cooldown_steps, max(0, max_steps - warmup))
    main = max(0, max_steps - warmup - cooldown)
    if step < warmup:
        return base * (step + 1) / warmup
    if step < warmup + main:
        return _main_phase(cfg.lr_scheduler_type, base, final, (step - warmup) / max(1, main))
    start = _main_phase(cfg.lr_scheduler_type, base, final, 1.0) if main else base
    progress = (step - warmup - main + 1) / max(1, cooldown)
    return final + (start - final) * (1.0 - math.sqrt(min(1.0, progress)))


def warmup_steps(cfg: Config, max_steps: int) -> int:
    return cfg.warmup_steps or int(round(cfg.warmup_ratio * max_steps))


def _main_phase(kind: str, base: float, final: float, p: float) -> float:
    if kind == "linear":
        return base + (final - base) * p
    if kind == "cosine":
        return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * p))
    return base  # wsd, constant


class _Group:
    def __init__(self, name: str, params: list[tuple[str, torch.nn.Parameter]], optimizer: str, weight_decay: float):
        self.name = name
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.weight_decay = weight_decay
        device = self.params[0].device
        dtype = self.params[0].dtype
        if any(p.dtype != dtype for p in self.params):
            raise ValueError(f"trainable parameters of mixed dtypes in group {name}")
        self.shapes = [tuple(p.shape) for p in self.params]
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        n = self.offsets[-1]
        self.master = torch.empty(n, dtype=torch.float32, device=device)
        self.work = None if dtype == torch.float32 else torch.empty(n, dtype=dtype, device=device)
        self.grads = torch.zeros(n, dtype=dtype, device=device)
        for i, p in enumerate(self.params):
            self.master[self.offsets[i]:self.offsets[i + 1]].copy_(p.detach().reshape(-1))
        if self.work is not None:
            self.work.copy_(self.master)
        self._bind()
        if optimizer == "adamw_8bit":
            from surogate.quant.optim import AdamW8bitState

            self.state8 = AdamW8bitState.zeros(n, device)
            self.exp_avg = self.exp_avg_sq = None
        else:
            self.state8 = None
            self.exp_avg = torch.zeros(n, dtype=torch.float32, device=device)
            self.exp_avg_sq = torch.zeros(n, dtype=torch.float32, device=device)

    def _bind(self) -> None:
        """Point every parameter's data and .grad at its slice of the flat buffers."""
        weights = self.master if self.work is None else self.work
        for i, p in enumerate(self.params):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            p.data = weights[lo:hi].view(self.shapes[i])
            p.grad = self.grads[lo:hi].view(self.shapes[i])

    def grads_bound(self) -> bool:
        """False if something replaced a .grad (then `collect_grads` copies them in)."""
        return all(p.grad is not None and p.grad.data_ptr() == self.grads[lo:].data_ptr()
                   for p, lo in zip(self.params, self.offsets))

    def collect_grads(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is not None and p.grad.data_ptr() != self.grads[self.offsets[i]:].data_ptr():
                self.grads[self.offsets[i]:self.offsets[i + 1]].copy_(p.grad.reshape(-1))
        self._bind()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"master": self.master}
        if self.state8 is None:
            out |= {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        else:
            out |= {k: getattr(self.state8, k) for k in ("m_codes", "v_codes", "m_absmax", "v_absmax")}
        return {f"{self.name}.{k}": v for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in self.state_tensors().items():
            t.copy_(tensors[key].to(t.device))
        if self.work is not None:
            self.work.copy_(self.master)  # round to nearest even, as the optimizer writes it


class FlatAdamW:
    """AdamW (fp32 or 8-bit states) over the model's trainable parameters in flat buffers. See the module doc."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], cfg: Config):
        self.cfg = cfg
        decay = [(n, p) for n, p in named_params if p.dim() >= 2]
        no_decay = [(n, p) for n, p in named_params if p.dim() < 2]
        self.groups = [_Group("decay", decay, cfg.optimizer, cfg.weight_decay)] if decay else []
        if no_decay:
            self.groups.append(_Group("no_decay", no_decay, cfg.optimizer, 0.0))
        self.n_params = sum(g.offsets[-1] for g in self.groups)

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grads.zero_()

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients: a 0-d fp32 tensor on the device (no host sync)."""
        from surogate.kernels import global_grad_norm

        for g in self.groups:
            if not g.grads_bound():
                g.collect_grads()
        norms = torch.stack([global_grad_norm(g.grads) for g in self.groups])
        return norms.pow(2).sum().sqrt()

    def step(self, *, lr: float, step: int, grad_scale: torch.Tensor | None = None) -> None:
        """One update; `step` counts from 1 (bias correction); grad_scale multiplies the gradients (clipping)."""
        cfg = self.cfg
        for g in self.groups:
            common = dict(lr=lr, beta1=cfg.adamw_beta1, beta2=cfg.adamw_beta2, eps=cfg.adamw_epsilon,
                          weight_decay=g.weight_decay, step=step, grad_scale=grad_scale, work_params=g.work)
            if g.state8 is not None:
                from surogate.quant.optim import adamw8bit_step

                adamw8bit_step(g.master, g.grads, g.state8, **common)
            else:
                from surogate.kernels import adamw_step

                adamw_step(g.master, g.grads, g.exp_avg, g.exp_avg_sq, **common)

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for g in self.groups:
            out |= g.state_tensors()
        return out

    def layout(self) -> dict:
        """Names and shapes per group: a checkpoint is only loaded into the same layout."""
        return {g.name: [[n, list(s)] for n, s in zip(g.names, g.shapes)] for g in self.groups}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for g in self.groups:
            g.load_state_tensors(tensors)

    def master_by_name(self) -> dict[str, torch.Tensor]:
        """fp32 master weights per parameter name (views)."""
        out = {}
        for g in self.groups:
            for i, name in enumerate(g.names):
                out[name] = g.master[g.offsets[i]:g.offsets[i + 1]].view(g.shapes[i])
        return out
