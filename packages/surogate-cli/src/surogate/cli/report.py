"""What a run shows and records: the step line, a progress bar, metrics.jsonl, training_plot.png, and optionally
tensorboard / wandb.

Step line (every logging_steps):
    step     40/400 [epoch 1  10.0%] | loss 1.2345 | norm 0.812 | lr 1.00e-03 | 52.1k tok/s | MFU 38.2% | mem 12.3 GB
The percentage is progress through the epoch being trained; tok/s counts every token of the step's rows
(micro-batch x sequence_len x accumulation), padding included, as the reference does; MFU = model FLOPs / peak
dense bf16 FLOPs of the GPU (shown only on a GPU we know); memory is the peak allocated on the GPU, or the peak RSS
of the process on a CPU.
metrics.jsonl: one JSON object per line, {"kind": "step" | "eval" | "final", "step": ..., ...}.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

from rich.console import Console

from .errors import UserError

# dense bf16 tensor-core peak FLOP/s by device name (datasheet figures, no sparsity)
PEAK_BF16 = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
             "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12,
             "RTX 5090": 209e12, "A10": 125e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_BF16[key]
    return None


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def first_step_memory(device, resident_bytes: int, host_bytes: int) -> str:
    """The log line after the first step: its peak, split into what was allocated before it (`resident_bytes`:
    weights, gradients, optimizer state, buffers) and the rest (activations and workspace), and the host memory the
    offload flags hold (`host_bytes`). Needs the peak counter reset before the step."""
    import torch

    if device.type != "cuda":
        return f"peak host memory (RSS) after the first step: {peak_memory_gb(device):.2f} GB"
    peak = torch.cuda.max_memory_allocated(device)
    text = (f"peak GPU memory allocated in the first step: {peak / 1e9:.2f} GB = weights, gradients, optimizer "
            f"state and buffers {resident_bytes / 1e9:.2f} GB + activations and workspace "
            f"{(peak - resident_bytes) / 1e9:.2f} GB")
    return text + (f"; host memory held by offloading: {host_bytes / 1e9:.2f} GB" if host_bytes else "")


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class RunLog:
    """Console + metrics.jsonl + plot + optional tensorboard/wandb for one run (rank 0)."""

    def __init__(self, output_dir: Path, *, report_to: list[str], run_name: str, config: dict, resume_step: int = 0,
                 wandb_project: str = "Surogate"):
        self.console = Console(highlight=False, soft_wrap=True, stderr=False)
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.records: list[dict] = []
        if resume_step > 0 and self.metrics_path.is_file():  # keep the history up to the checkpoint, drop the rest
            for line in self.metrics_path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("step", 0) <= resume_step and r.get("kind") != "final":
                    self.records.append(r)
        self._rewrite_metrics()
        self.progress = None
        self._task = None
        self._tb = self._wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("report_to asks for tensorboard, which is not installed", key="report_to",
                                fix='pip install "surogate-cli[report]" or remove tensorboard from report_to') from None
            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise UserError("report_to asks for wandb, which is not installed", key="report_to",
                                fix='pip install "surogate-cli[report]" or remove wandb from report_to') from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    # ------------------------------------------------------------------------------------------------ console
    def info(self, text: str) -> None:
        self.console.print(text, markup=False)

    def rule(self, text: str) -> None:
        self.console.print(f"[bold]{text}[/bold]")

    def start_progress(self, total: int, done: int) -> None:
        if not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.progress.start()
        self._task = self.progress.add_task("train", total=total, completed=done)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self._task)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # ------------------------------------------------------------------------------------------------ records
    def step(self, record: dict, *, total: int, print_line: bool) -> None:
        self._add({"kind": "step", **record})
        if print_line:
            r = record
            mfu = f" | MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
            self.info(f"step {r['step']:>6}/{total} [epoch {r['epoch'] + 1} {100 * r['epoch_progress']:5.1f}%] | "
                      f"loss {r['loss']:.4f} | "
                      f"norm {r['grad_norm']:.3f} | lr {r['lr']:.2e} | {_fmt_rate(r['tok_per_s'])} tok/s{mfu} | "
                      f"mem {r['mem_gb']:.2f} GB")

    def eval(self, record: dict) -> None:
        self._add({"kind": "eval", **record})
        train = f" | train {record['train_loss']:.4f}" if record.get("train_loss") is not None else ""
        self.console.print(f"[bold]eval  {record['step']:>6} | eval loss {record['eval_loss']:.4f}{train} | "
                           f"{record['eval_tokens']} tokens[/bold]")

    def final(self, record: dict) -> None:
        self._add({"kind": "final", **record})

    def _add(self, record: dict) -> None:
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        prefix = {"step": "train"}.get(record["kind"], record["kind"])  # train/loss, eval/eval_loss, final/...
        scalars = {f"{prefix}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def _rewrite_metrics(self) -> None:
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.metrics_path)

    def plot(self) -> Path | None:
        """training_plot.png: training loss (raw and smoothed) and eval loss against the step."""
        steps = [r for r in self.records if r["kind"] == "step"]
        if not steps:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [r["step"] for r in steps]
        ys = [r["loss"] for r in steps]
        smooth, s = [], ys[0]
        alpha = 2.0 / (1.0 + max(1, min(20, len(ys) // 40)))  # EMA over ~len/40 steps: little lag
        for y in ys:
            s = alpha * y + (1 - alpha) * s
            smooth.append(s)
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(xs, smooth, color="tab:blue", linewidth=2, label="train loss (smoothed)")
        evals = [r for r in self.records if r["kind"] == "eval"]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange",
                    label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.output_dir / "training_plot.png"
        tmp = self.output_dir / "training_plot.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out)
        return out

    def close(self) -> None:
        self.stop_progress()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        sys.stdout.flush()
