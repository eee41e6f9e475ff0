"""Training curves of each recipe, QLoRA mode and optimizer against BF16 on the quickstart task (word reversal).

    python tools/quant_curves.py                          # CPU or GPU, whichever this machine has
    python tools/quant_curves.py --out-dir $OUT --work /tmp/qc

Two families, each with its own BF16 reference; every run sees the same rows in the same order (same seed), so the
curves differ only by the numerics:
- full fine-tuning of the random quickstart model (examples/quickstart/model: Qwen3, hidden 128, intermediate 384,
  2 layers; every quantised GEMM dimension a multiple of 128, so FP8 tiles and NVFP4 16-blocks fit without
  padding): bf16 (reference), fp8-hybrid, nvfp4 (its default: the last layer BF16), nvfp4-all-layers
  (a known limitation: it stalls), nvfp4-1d-weights (every layer, weights in 1-D blocks), and optimizer adamw_8bit
  (when the trainer supports it).
- LoRA (rank 16, every linear) on a base made first by --base-steps of BF16 full fine-tuning (a LoRA on the
  random base barely learns the task: its loss stays near 4.4): lora-bf16 (reference), qlora_fp8 (E4M3, 128x128
  tiles), qlora_fp4 (NVFP4), qlora_bnb (NF4, block 64, double quant).
"bf16" means the model dtype: BF16 on a GPU, fp32 on CPU (where the quantised GEMMs are exact emulations).

Full fine-tuning runs the quickstart's 800 steps by default: the task has a plateau near 2.1 that each run leaves
at a different step (between ~250 and ~450 here), so a comparison part-way (e.g. at 400 steps) measures when the
drop started rather than where training ends; at 800 steps every run has converged (bf16 ~0.001 on CPU).

Check: final loss = mean training loss of the last --tail steps; a mode passes when
    final(mode) <= final(reference) + max(--abs-margin, --rel-margin * final(reference)).
One-sided: a mode that ends lower than BF16 passes. The defaults (0.05 nats or 5%) are the margin tests/quant state.
A mode with a documented limitation (`known`) that misses is reported as "known" and does not fail the exit status.

Writes <out-dir>/quant_curves.csv (mode, family, step, loss, lr, device), <out-dir>/quant_curves_summary.csv
(final losses, margins, pass / fail / skipped with the reason) and <out-dir>/quant_curves.png; prints the table.
Exit status 1 when a mode misses its margin.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# a busy CPU box: spinning OpenMP threads make the tiny CPU GEMMs 5-45x slower (the test suite sets the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
SFT_YAML = REPO / "examples" / "quickstart" / "sft.yaml"
ABS_MARGIN = 0.05
REL_MARGIN = 0.05


@dataclass
class Mode:
    name: str
    family: str  # "full" or "lora"
    overrides: list[str] = field(default_factory=list)
    reference: bool = False
    known: str = ""  # a documented limitation: a miss is reported as "known", not FAIL (exit status 0)


LORA = ["lora=true", "lora_rank=16", "lora_alpha=32", "lora_target_modules=all-linear"]
MODES = [
    Mode("bf16", "full", reference=True),
    Mode("fp8-hybrid", "full", ["recipe=fp8-hybrid"]),
    # nvfp4 with its defaults: the last 15% of the layers in BF16, at least 1 (here the last of the 2 layers; the
    # reference's fp4 benchmark keeps 4 of 28, the NVFP4 paper ~15%). Every layer NVFP4 in 16x16 weight tiles stalls
    # at ~0.2 on this task (ablations: benchmarks/quant_curves_nvfp4_ablation.csv), reported as a known limitation.
    Mode("nvfp4", "full", ["recipe=nvfp4"]),
    Mode("nvfp4-all-layers", "full", ["recipe=nvfp4", "skip_quant_last_layers=0"],
         known="every layer NVFP4 (2-layer model): stalls near 0.2, see benchmarks/quant_curves_nvfp4_ablation.csv; "
               "keep the last layers BF16 (the default) or use fp4_disable_2d_quantization"),
    Mode("nvfp4-1d-weights", "full",  # every layer NVFP4, weights in 1-D blocks
         ["recipe=nvfp4", "skip_quant_last_layers=0", "fp4_disable_2d_quantization=true"]),
    Mode("adamw_8bit", "full", ["optimizer=adamw_8bit"]),
    Mode("lora-bf16", "lora", LORA, reference=True),
    Mode("qlora_fp8", "lora", [*LORA, "qlora_fp8=true"]),
    Mode("qlora_fp4", "lora", [*LORA, "qlora_fp4=true"]),
    Mode("qlora_bnb", "lora", [*LORA, "qlora_bnb=true"]),
]


@dataclass
class Result:
    mode: Mode
    losses: list[float]
    lrs: list[float]
    seconds: float
    skipped: str = ""  # why it did not run

    def final(self, tail: int) -> float:
        return sum(self.losses[-tail:]) / len(self.losses[-tail:])


def margin(reference: float, abs_margin: float = ABS_MARGIN, rel_margin: float = REL_MARGIN) -> float:
    return max(abs_margin, rel_margin * reference)


def _not_supported(argv: list[str]) -> str:
    """The trainer's 'not supported yet' message for this config and machine ('' when it runs)."""
    from surogate.cli.config import check_supported, load_config
    from surogate.cli.errors import NotSupportedYet
    from surogate.cli.train import _device, _model_options

    cfg = load_config(argv[1], argv[2:], command="sft")
    try:
        check_supported(cfg, device=_device().type, model_options=_model_options())
    except NotSupportedYet as e:
        return str(e)
    return ""


def train_once(name: str, overrides: list[str], work: Path, steps: int, common: list[str],
               tokenized: Path | None) -> tuple[list[float], list[float], float, str]:
    """One in-process `surogate sft` run -> (losses, lrs, seconds, skipped reason)."""
    from surogate.cli.app import main

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if tokenized is not None and tokenized.is_dir():  # the same data and tokenizer: reuse the shards
        shutil.copytree(tokenized, out / "tokenized")
    argv = ["sft", str(SFT_YAML), f"output_dir={out}", f"max_steps={steps}", "eval_steps=0",
            "eval_exact_match_samples=0", "save_steps=0", "report_to=[]", *common, *overrides]
    reason = _not_supported(argv)
    if reason:
        return [], [], 0.0, reason
    t0 = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"quant_curves: `surogate {' '.join(argv)}` exited {code}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "step"]
    return [r["loss"] for r in rows], [r["lr"] for r in rows], seconds, ""


def run_curves(work: Path, *, steps: int, lora_steps: int, base_steps: int, modes: list[Mode] = MODES,
               common: list[str] = (), on_result=None) -> tuple[list[Result], str]:
    """Train every mode; -> (results in MODES order, device name). `common`: overrides for every run (tests use
    short rows); on_result(results so far, device) after each mode (the outputs survive a time limit)."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    work.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    tokenized = None
    base = None
    for mode in modes:
        extra = list(common)
        n = steps
        if mode.family == "lora":
            n = lora_steps
            if base is None:  # the LoRA base: BF16 full fine-tuning, its cooldown within base_steps
                train_once("base", [f"cooldown_steps={max(1, base_steps // 3)}"], work, base_steps, extra, tokenized)
                base = work / "base" / "model"
            extra.append(f"model={base}")
        losses, lrs, seconds, skipped = train_once(mode.name, mode.overrides, work, n,
                                                   [*extra, f"cooldown_steps={max(1, n // 4)}"], tokenized)
        if tokenized is None and not skipped:
            tokenized = work / mode.name / "tokenized"
        results.append(Result(mode, losses, lrs, seconds, skipped))
        if on_result is not None:
            on_result(results, device)
    return results, device


def summarize(results: list[Result], tail: int, abs_margin: float = ABS_MARGIN, rel_margin: float = REL_MARGIN
              ) -> list[dict]:
    refs = {r.mode.family: r for r in results if r.mode.reference and not r.skipped}
    rows = []
    for r in results:
        ref = refs[r.mode.family]
        row = {"mode": r.mode.name, "family": r.mode.family, "reference": ref.mode.name, "steps": len(r.losses),
               "seconds": round(r.seconds, 1)}
        if r.skipped:
            rows.append({**row, "status": "skipped", "note": r.skipped})
            continue
        f, fr = r.final(tail), ref.final(tail)
        m = margin(fr, abs_margin, rel_margin)
        status, note = ("pass" if f <= fr + m else "FAIL"), ""
        if r is not ref and r.losses == ref.losses:  # bit-identical curves: the mode was not applied at all
            status, note = "FAIL", f"losses identical to {ref.mode.name}: the setting had no effect"
        elif status == "FAIL" and r.mode.known:
            status, note = "known", r.mode.known
        rows.append({**row, "first_loss": round(r.losses[0], 4), "final_loss": round(f, 4),
                     "reference_final": round(fr, 4), "delta": round(f - fr, 4), "margin": round(m, 4),
                     "status": status, "note": note})
    return rows


def write_outputs(results: list[Result], summary: list[dict], device: str, out_dir: Path, tail: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "quant_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "family", "step", "loss", "lr", "device"])
        for r in results:
            for i, (loss, lr) in enumerate(zip(r.losses, r.lrs, strict=True)):
                w.writerow([r.mode.name, r.mode.family, i + 1, f"{loss:.6f}", f"{lr:.6g}", device])
    keys = ["mode", "family", "reference", "steps", "seconds", "first_loss", "final_loss", "reference_final", "delta",
            "margin", "status", "note"]
    with open(out_dir / "quant_curves_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, restval="")
        w.writeheader()
        w.writerows(summary)
    _plot(results, device, out_dir / "quant_curves.png", tail)


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _plot(results: list[Result], device: str, path: Path, tail: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, family, title in ((axes[0], "full", "full fine-tuning (random quickstart model)"),
                              (axes[1], "lora", "LoRA r16 on a BF16-pretrained base")):
        for r in results:
            if r.mode.family != family or r.skipped:
                continue
            ax.plot(range(1, len(r.losses) + 1), _smooth(r.losses, 10), label=r.mode.name,
                    lw=2.2 if r.mode.reference else 1.2, color="black" if r.mode.reference else None)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (10-step mean)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"quickstart word reversal: recipes / QLoRA / optimizers vs BF16 ({device}; final = mean of the "
                 f"last {tail} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    p.add_argument("--work", default=str(REPO / "output" / "quant_curves"), help="run folders (replaced)")
    p.add_argument("--steps", type=int, default=800, help="full fine-tuning steps (the quickstart's: it converges)")
    p.add_argument("--lora-steps", type=int, default=300)
    p.add_argument("--base-steps", type=int, default=120, help="BF16 full fine-tuning steps of the LoRA base")
    p.add_argument("--tail", type=int, default=50, help="the final loss is the mean of the last TAIL steps")
    p.add_argument("--abs-margin", type=float, default=ABS_MARGIN)
    p.add_argument("--rel-margin", type=float, default=REL_MARGIN)
    p.add_argument("--modes", default="", help="comma-separated subset (their families' references run too)")
    args = p.parse_args(argv)
    modes = MODES
    if args.modes:
        wanted = set(args.modes.split(","))
        unknown = wanted - {m.name for m in MODES}
        if unknown:
            p.error(f"unknown modes {sorted(unknown)}; choose from {[m.name for m in MODES]}")
        families = {m.family for m in MODES if m.name in wanted}
        modes = [m for m in MODES if m.name in wanted or (m.reference and m.family in families)]
    def write(results, device):
        write_outputs(results, summarize(results, args.tail, args.abs_margin, args.rel_margin), device,
                      Path(args.out_dir), args.tail)

    results, device = run_curves(Path(args.work), steps=args.steps, lora_steps=args.lora_steps,
                                 base_steps=args.base_steps, modes=modes, on_result=write)
    summary = summarize(results, args.tail, args.abs_margin, args.rel_margin)
    print(f"\nquant curves on {device} (final = mean loss of the last {args.tail} steps; pass: final <= reference "
          f"final + max({args.abs_margin}, {args.rel_margin} x reference final))")
    for row in summary:
        if row["status"] == "skipped":
            print(f"  {row['mode']:<16} skipped: {row['note']}")
        else:
            print(f"  {row['mode']:<16} {row['final_loss']:.4f} vs {row['reference']} {row['reference_final']:.4f} "
                  f"(delta {row['delta']:+.4f}, margin {row['margin']:.4f}) {row['status']}  [{row['seconds']} s] "
                  f"{row['note']}")
    print(f"wrote {Path(args.out_dir) / 'quant_curves.csv'}, quant_curves_summary.csv, quant_curves.png")
    return 1 if any(r["status"] == "FAIL" for r in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
