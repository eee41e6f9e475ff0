"""How far fp8-hybrid's loss, logits and gradients land from fp32 on a random Qwen3-0.6B-shaped model, per variant:
bf16, fp8 through torch._scaled_mm, the exact emulation, current gradient scaling, and without the calibration pass.
Each fp8 variant runs one forward + backward and after_optimizer_step() first, so the measured pass uses delayed
scales. Usage: python tools/dev/fp8_model_errors.py [--layers 28] [--tokens 4096]  (CUDA; prints one row each)."""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "models"))
sys.path.insert(0, str(ROOT / "tools" / "bench"))
from bench_sft import SHAPES  # noqa: E402
from tiny_hf import packed_inputs  # noqa: E402

from surogate.models import init_model  # noqa: E402
from surogate.quant import Recipe  # noqa: E402


def run(model, ids, labels, pos):
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, labels, pos)
    loss.backward()
    with torch.no_grad():
        logits = model(ids, pos).float()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), logits, grads


def errors(got, want):
    (loss, logits, grads), (loss0, logits0, grads0) = got, want
    num = sum(((grads[n] - grads0[n]).double().norm() ** 2).item() for n in grads0)
    den = sum((grads0[n].double().norm() ** 2).item() for n in grads0)
    worst = max(grads0, key=lambda n: ((grads[n] - grads0[n]).norm() / grads0[n].norm()).item())
    worst_err = ((grads[worst] - grads0[worst]).norm() / grads0[worst].norm()).item()
    return (
        abs(loss - loss0) / loss0,
        ((logits - logits0).norm() / logits0.norm()).item(),
        (num / den) ** 0.5,
        worst,
        worst_err,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    cfg = dict(SHAPES["qwen3-0.6b"], num_hidden_layers=args.layers)
    n = args.layers
    half = args.tokens // 2
    docs = [[half // 3, half // 2, half - half // 3 - half // 2], [half]]  # a packed row and a one-document row
    ids, labels, pos, _ = packed_inputs(torch.Generator().manual_seed(1), docs, vocab=151936)
    ids, labels, pos = ids.cuda(), labels.cuda(), pos.cuda()
    want = run(init_model(cfg, dtype=torch.float32, device="cuda", seed=3), ids, labels, pos)
    variants = {
        "bf16": "bf16",
        "fp8 scaled_mm": Recipe("fp8-hybrid", n_layers=n),
        "fp8 emulate": Recipe("fp8-hybrid", n_layers=n, gemm="emulate"),
        "fp8 current dy": Recipe("fp8-hybrid", n_layers=n, grad_scaling="current"),
        "fp8 no cache": Recipe("fp8-hybrid", n_layers=n, cache_weights=False),
        "fp8 uncalibrated": Recipe("fp8-hybrid", n_layers=n),
    }
    print(f"{args.layers} layers, {args.tokens} tokens; errors against fp32 on the GPU")
    print(f"{'variant':18s} {'loss':>9s} {'logits':>7s} {'grads':>7s}  worst gradient")
    for name, recipe in variants.items():
        model = init_model(cfg, dtype=torch.bfloat16, device="cuda", seed=3, recipe=recipe)
        if name.startswith("fp8"):
            run(model, ids, labels, pos)  # calibration: just-in-time scales, amaxes recorded
            model.after_optimizer_step()
        if name == "fp8 uncalibrated":  # TE's first step instead: encode with scale 1, record the amaxes, update
            for ds in (recipe._scaling, recipe._grad_scaling):
                ds.scale.fill_(1.0), ds.scale_inv.fill_(1.0), ds.amax_history.zero_()
            run(model, ids, labels, pos)
            model.after_optimizer_step()
        loss, logits_err, grads_err, worst, worst_err = errors(run(model, ids, labels, pos), want)
        print(f"{name:18s} {loss:9.2e} {logits_err:7.3f} {grads_err:7.3f}  {worst} {worst_err:.3f}", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
