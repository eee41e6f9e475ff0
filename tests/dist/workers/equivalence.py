"""Tiny models trained with surogate.dist, under mpirun (W ranks x b rows) or in one process (1 rank x W*b rows).

    mpiexec -n 2 python tests/dist/workers/equivalence.py --out DIR [--device cuda] [--configs full-0 lora-3 ...]

Models (CONFIGS names are "<model>-<zero level>", plus "-offload": ZeRO-2 with offload_grads, the fp32 gradient shard
in host memory):
- full: 3 residual tanh layers + a linear head, every weight trainable (groups: one per layer + the head);
  loss = mean cross-entropy over the global batch (gradients averaged over ranks).
- lora: the same with frozen base weights, trainable rank-2 adapters A, B per layer and a frozen head (an empty
  group); loss = sum of cross-entropy over unmasked rows / the global count of unmasked rows (gradients summed).
- module: "full" as an nn.Module trained by autograd: parameters bound into the flat buffers (bind_parameters),
  bucket reductions launched by post-accumulate-grad hooks (ZeRO 0-2).
- bf16: "full" with bf16 weights the model reads (and bf16 gradient buffers at ZeRO 0-2) over the fp32 master:
  step_fn writes the rounded weights into `work`.
full, lora and bf16 run forward and backward layer by layer through dp.gather / prefetch / release / grad_buffer /
grad_ready, so every ZeRO level (3 included) takes the same code path; each step has 2 micro-steps, global-norm
clipping and a plain AdamW step_fn. Rank 0 writes DIR/<config>.npz (losses, grad norms, final master weights).
With --checkpoints, every config also round-trips its state through both checkpoint forms (asserted here) and
full-1 leaves DIR/ckpt-gathered and DIR/ckpt-ranks for the test to load at world size 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import surogate.dist as sd
import torch
import torch.nn.functional as F

D, C, R, LAYERS = 12, 5, 2, 3
STEPS, GA, GLOBAL_ROWS = 4, 2, 8  # GLOBAL_ROWS per micro-step, split over the ranks
MAX_NORM = 0.5  # clips on some steps (grad norms here are ~0.3-1)
CONFIGS = [f"{m}-{z}" for m in ("full", "lora", "bf16") for z in (0, 1, 2, 3)] + [f"module-{z}" for z in (0, 1, 2)]
CONFIGS += ["full-2-offload", "bf16-2-offload"]


def parse(config: str) -> tuple[str, int, bool]:
    """"bf16-2-offload" -> ("bf16", 2, True): model, ZeRO level, offload_grads."""
    model, zero, *rest = config.split("-")
    return model, int(zero), rest == ["offload"]


def group_sizes(model: str) -> list[int]:
    if model == "lora":
        return [2 * R * D] * LAYERS + [0]
    return [D * D + D] * LAYERS + [C * D + C]


def bucket_numel(model: str, zero: int) -> int:
    if zero == 3:
        return 0  # one bucket per layer: ZeRO-3 gathers a layer at a time
    # full: buckets {layer 0, 1}, {layer 2, head}; lora: {layer 0, 1}, {layer 2, empty head}
    return 200 if model != "lora" else 60


def initial_weights(model: str) -> tuple[torch.Tensor, dict]:
    """(canonical trainable weights, frozen tensors), the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    frozen = {
        "W": [torch.randn(D, D, generator=g) * 0.3 for _ in range(LAYERS)],
        "b": [torch.randn(D, generator=g) * 0.1 for _ in range(LAYERS)],
        "Wh": torch.randn(C, D, generator=g) * 0.3,
        "bh": torch.randn(C, generator=g) * 0.1,
    }
    if model == "lora":
        trainable = torch.randn(LAYERS * 2 * R * D, generator=g) * 0.3
    else:
        trainable = torch.cat(
            [torch.cat([frozen["W"][i].reshape(-1), frozen["b"][i]]) for i in range(LAYERS)]
            + [frozen["Wh"].reshape(-1), frozen["bh"]]
        )
    return trainable, frozen


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    x = torch.randn(STEPS, GA, GLOBAL_ROWS, D, generator=g)
    y = torch.randint(0, C, (STEPS, GA, GLOBAL_ROWS), generator=g)
    mask = (torch.rand(STEPS, GA, GLOBAL_ROWS, generator=g) < 0.7).float()
    mask[:, :, 0] = 1.0  # at least one valid row per step
    return x, y, mask


def layer(model: str, i: int, x: torch.Tensor, w: torch.Tensor, frozen: dict) -> torch.Tensor:
    w = w.float()  # bf16 weights compute in fp32
    if model == "lora":
        a, b = w[: R * D].view(R, D), w[R * D :].view(D, R)
        h = x @ frozen["W"][i].T + frozen["b"][i] + (x @ a.T) @ b.T
    else:
        h = x @ w[: D * D].view(D, D).T + w[D * D :]
    return x + torch.tanh(h)


def head(model: str, x: torch.Tensor, w: torch.Tensor, frozen: dict) -> torch.Tensor:
    w = w.float()
    if model == "lora":
        return x @ frozen["Wh"].T + frozen["bh"]
    return x @ w[: C * D].view(C, D).T + w[C * D :]


def loss_of(model, logits, y, mask, norm) -> torch.Tensor:
    if model == "lora":
        return (F.cross_entropy(logits, y, reduction="none") * mask).sum() / norm
    return F.cross_entropy(logits, y) / GA


def explicit_micro_step(dp: sd.DataParallel, model: str, frozen: dict, x, y, mask, norm) -> torch.Tensor:
    """Forward layer by layer (gathered weights), loss, then backward layer by layer in reverse."""
    xs = [x]
    dp.prefetch(0)
    with torch.no_grad():
        for i in range(LAYERS):
            w = dp.gather(i)
            dp.prefetch(i + 1)
            xs.append(layer(model, i, xs[-1], w, frozen))
            dp.release(i)
    w = dp.gather(LAYERS).detach().requires_grad_()
    x_last = xs[-1].detach().requires_grad_()
    loss = loss_of(model, head(model, x_last, w, frozen), y, mask, norm)
    if w.numel():
        dy, dw = torch.autograd.grad(loss, (x_last, w))
        dp.grad_buffer(LAYERS).add_(dw)
    else:
        (dy,) = torch.autograd.grad(loss, (x_last,))
    dp.grad_ready(LAYERS)
    dp.release(LAYERS)
    for i in reversed(range(LAYERS)):
        w = dp.gather(i).detach().requires_grad_()
        dp.prefetch(i - 1)
        x_in = xs[i].detach().requires_grad_()
        dy, dw = torch.autograd.grad(layer(model, i, x_in, w, frozen), (x_in, w), dy)
        dp.grad_buffer(i).add_(dw)
        dp.grad_ready(i)
        dp.release(i)
    return loss.detach()


class Mlp(torch.nn.Module):
    def __init__(self, canonical: torch.Tensor):
        super().__init__()
        self.w = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        at = 0
        for _ in range(LAYERS):
            self.w.append(torch.nn.Parameter(canonical[at : at + D * D].view(D, D).clone()))
            self.b.append(torch.nn.Parameter(canonical[at + D * D : at + D * D + D].clone()))
            at += D * D + D
        self.wh = torch.nn.Parameter(canonical[at : at + C * D].view(C, D).clone())
        self.bh = torch.nn.Parameter(canonical[at + C * D :].clone())

    def groups(self) -> list[list[torch.nn.Parameter]]:
        return [[self.w[i], self.b[i]] for i in range(LAYERS)] + [[self.wh, self.bh]]

    def forward(self, x):
        for w, b in zip(self.w, self.b, strict=True):
            x = x + torch.tanh(x @ w.T + b)
        return x @ self.wh.T + self.bh


def adamw_(p, g, s, work, t, lr=0.02, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1) -> None:
    """Plain torch AdamW over flat buffers: fp32 master p, grads g (any float dtype), state s; work <- p."""
    g = g.float()
    s["exp_avg"].lerp_(g, 1 - beta1)
    s["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.mul_(1 - lr * weight_decay)
    denom = (s["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
    p.addcdiv_(s["exp_avg"], denom, value=-lr / (1 - beta1**t))
    if work is not None:
        work.copy_(p)


def adam_state(master: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}


def build(world: sd.World, config: str, canonical: torch.Tensor):
    model, zero, offload = parse(config)
    layout = sd.FlatLayout(group_sizes(model), world.world_size, bucket_numel=bucket_numel(model, zero))
    dtype = torch.bfloat16 if model == "bf16" else torch.float32
    params = layout.from_canonical(canonical.to(world.device, dtype))
    grads = torch.zeros_like(params) if zero < 3 else None
    module = None
    if model == "module":
        module = Mlp(canonical).to(world.device)
        sd.bind_parameters(layout, module.groups(), params, grads)
    dp = sd.DataParallel(world, layout, params, grads, zero=zero, make_state=adam_state, average=model != "lora",
                          offload_grads=offload)
    if module is not None:
        dp.register_grad_hooks(module.groups())
    return dp, module


def train(world: sd.World, config: str) -> dict[str, np.ndarray] | None:
    """Trains one config; returns losses, grad norms and final master weights on rank 0 (None elsewhere)."""
    model = parse(config)[0]
    canonical, frozen = initial_weights(model)
    frozen = {
        k: [t.to(world.device) for t in v] if isinstance(v, list) else v.to(world.device) for k, v in frozen.items()
    }
    dp, module = build(world, config, canonical)
    x_all, y_all, mask_all = (t.to(world.device) for t in data())
    rows = world.local_slice(GLOBAL_ROWS)
    losses, norms = [], []
    for step in range(STEPS):
        x, y, mask = x_all[step][:, rows], y_all[step][:, rows], mask_all[step][:, rows]
        norm = world.sum(mask.sum()) if model == "lora" else None  # valid rows of the global batch
        total = torch.zeros((), device=world.device)
        for m in range(GA):
            with dp.micro_step(last=m == GA - 1):
                if module is not None:
                    loss = loss_of(model, module(x[m]), y[m], mask[m], norm)
                    loss.backward()
                    total += loss.detach()
                else:
                    total += explicit_micro_step(dp, model, frozen, x[m], y[m], mask[m], norm)
        loss = world.sum(total) if model == "lora" else world.mean(total)
        grad_norm = dp.grad_norm()
        clip = torch.clamp(MAX_NORM / (grad_norm + 1e-6), max=1.0)
        dp.step(lambda p, g, s, w, t=step + 1, c=clip: adamw_(p, g * c, s, w, t))
        dp.zero_grad()
        losses.append(float(loss))
        norms.append(float(grad_norm))
    final = dp.full_master()
    # what the model reads is the master, rounded to its dtype, on every rank
    mine = dp._to_canonical(dp.master, world.rank)
    here = (
        dp.layout.to_canonical(dp.params)
        if dp.params is not None
        else torch.cat([dp.gather(g) for g in range(len(dp.layout.group_sizes))])
    ).cpu()
    assert torch.equal(here, mine.to(here.dtype)), f"{config}: weights differ from the master on rank {world.rank}"
    if world.is_main:
        return {"losses": np.array(losses), "norms": np.array(norms), "final": final.numpy()}
    return None


def checkpoint_round_trip(world: sd.World, config: str, out: Path) -> None:
    """Train, save in both forms, load each into a fresh engine: master, state and params come back exactly."""
    model = parse(config)[0]
    canonical, _ = initial_weights(model)
    dp, _ = build(world, config, canonical)
    g = torch.Generator().manual_seed(5)

    def random_like_master() -> torch.Tensor:  # padding stays zero, as training keeps it
        flat = dp.layout.from_canonical(torch.rand(dp.layout.canonical_numel, generator=g))
        return flat if dp.zero == 0 else dp.layout.shard_of(flat, world.rank)

    dp.master.copy_(random_like_master())  # stand-in for training
    for t in dp.state.values():
        t.copy_(random_like_master())
    for form in ("gathered", "ranks"):
        directory = out / f"ckpt-{config}-{form}"
        dp.save_state(directory, gathered=form == "gathered")
        fresh, _ = build(world, config, canonical * 0.5)
        fresh.load_state(directory)
        assert torch.equal(fresh.master, dp.master), f"{config} {form}: master differs after load"
        for name, t in dp.state.items():
            assert torch.equal(fresh.state[name], t), f"{config} {form}: state {name} differs after load"
        mine = fresh._to_canonical(fresh.master, world.rank)
        here = (
            fresh.layout.to_canonical(fresh.params)
            if fresh.params is not None
            else torch.cat([fresh.gather(g) for g in range(len(fresh.layout.group_sizes))])
        ).cpu()
        assert torch.equal(here, mine.to(here.dtype)), f"{config} {form}: the model's weights differ from the master"
    master = dp.full_master()
    if master is not None:
        np.save(out / f"ckpt-{config}-master.npy", master.numpy())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    parser.add_argument("--checkpoints", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with sd.abort_on_error():
        world = sd.init(args.device)
        for config in args.configs:
            result = train(world, config)
            if result is not None:
                np.savez(args.out / f"{config}.npz", **result)
        for config in args.checkpoints:
            checkpoint_round_trip(world, config, args.out)
        world.barrier()
        sd.shutdown()


if __name__ == "__main__":
    main()
