"""Optimizer offloading and 8-bit AdamW on one GPU: tokens/s and peak GPU memory of the trainer's step.

For Qwen3-4B / Qwen3-8B shapes with random weights (bench_sft.SHAPES), full fine-tune and LoRA, it runs
surogate.cli.step.TrainStep (CUDA graphs on) with each optimizer variant:
  none, offload_optimizer, offload_master, offload_both (fp32 AdamW), adamw_8bit, adamw_8bit+offload_optimizer,
  adamw_8bit+offload_both, every offloaded one through both methods (zero_copy: the kernel reads pinned host memory
  in place; stream: double-buffered chunks through the GPU).
A row that runs out of GPU memory is recorded as OOM and the run goes on; a row whose pinned host buffers would not
fit in the host's available memory is skipped (said so). Per row: tokens/s of an optimizer step over `accum`
micro-batches, the optimizer step's own time (replayed alone), peak GPU memory (max_memory_allocated over build +
warm-up + capture + steps), pinned host bytes, and the tokens/s projected at --project-accum micro-batches per
optimizer step (accum * tokens / (accum * micro-step time + optimizer time)): offloading costs a fixed time per
optimizer step, which gradient accumulation amortises.

The 8B target: full fine-tune with fp32 master + fp32 AdamW states (8.2B x 12 bytes = 98 GB, plus bf16 weights and
grads 33 GB: ~131 GB, ~112 GB without the work weights) on one 80 GB H100 with offload_optimizer + offload_master, at
>= 60% of the tokens/s it would have without offloading, estimated from the 4B shape (4B tokens/s without offload x
the ratio of FLOPs per token). No recompute is needed at micro-batch 1 x 2048 tokens (bf16 weights 16.4 GB + grads
16.4 GB + activations ~11 GB); pass --recompute block to trade compute for memory.

Rows are appended to --out (bench_sft's CSV columns; framework = surogate[variant:method], tokens_per_s = "oom" for
rows that ran out of memory) and everything to --json. A time budget (--budget-s) skips the remaining rows rather
than run over. On an H100, the default set takes about 5 minutes:

  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python tools/bench/bench_offload.py --out $OUT/offload.csv \\
      --json $OUT/offload.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sft  # noqa: E402  (SHAPES, hf_config, make_batches, model_flops_per_token, time_steps)
from _timing import append_rows  # noqa: E402

VARIANTS = {
    "none": dict(optimizer="adamw"),
    "offload_optimizer": dict(optimizer="adamw", offload_optimizer=True),
    "offload_master": dict(optimizer="adamw", offload_master=True),
    "offload_both": dict(optimizer="adamw", offload_optimizer=True, offload_master=True),
    "adamw_8bit": dict(optimizer="adamw_8bit"),
    "adamw_8bit+offload_optimizer": dict(optimizer="adamw_8bit", offload_optimizer=True),
    "adamw_8bit+offload_both": dict(optimizer="adamw_8bit", offload_optimizer=True, offload_master=True),
}
ZC, ST = "zero_copy", "stream"
DEVICE = "cuda"
# (model, mode, variant, method, accum), most important first: the 4B baseline, the 8B target, then the rest
DEFAULT_ROWS = [
    ("qwen3-4b", "full", "none", None, 1),
    ("qwen3-8b", "full", "offload_both", ZC, 8),
    ("qwen3-8b", "full", "offload_both", ST, 8),
    ("qwen3-4b", "full", "offload_optimizer", ZC, 1),
    ("qwen3-4b", "full", "offload_optimizer", ST, 1),
    ("qwen3-4b", "full", "offload_master", ZC, 1),
    ("qwen3-4b", "full", "offload_master", ST, 1),
    ("qwen3-4b", "full", "offload_both", ZC, 1),
    ("qwen3-4b", "full", "offload_both", ST, 1),
    ("qwen3-4b", "full", "adamw_8bit", None, 1),
    ("qwen3-4b", "full", "adamw_8bit+offload_optimizer", ZC, 1),
    ("qwen3-4b", "full", "adamw_8bit+offload_optimizer", ST, 1),
    ("qwen3-8b", "full", "none", None, 1),  # fp32 master + states do not fit: OOM expected
    ("qwen3-8b", "full", "adamw_8bit+offload_both", ZC, 8),
    ("qwen3-8b", "full", "adamw_8bit+offload_both", ST, 8),
    ("qwen3-4b", "lora", "none", None, 1),
    ("qwen3-4b", "lora", "offload_both", ZC, 1),
    ("qwen3-4b", "lora", "offload_both", ST, 1),
    ("qwen3-4b", "lora", "adamw_8bit+offload_optimizer", ZC, 1),
    ("qwen3-8b", "lora", "none", None, 1),
    ("qwen3-8b", "lora", "offload_both", ZC, 1),
    ("qwen3-8b", "lora", "offload_both", ST, 1),
    ("qwen3-8b", "lora", "adamw_8bit", None, 1),
    ("qwen3-8b", "lora", "adamw_8bit+offload_optimizer", ZC, 1),
]


def host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def pinned_bytes_needed(name: str, mode: str, variant: str) -> int:
    """Pinned host bytes the variant allocates for a full fine-tune (LoRA: small; 0 = not checked)."""
    if mode != "full":
        return 0
    n, _ = bench_sft.count_params(name)
    v = VARIANTS[variant]
    state = 8 if v["optimizer"] == "adamw" else 2
    return n * ((4 if v.get("offload_master") else 0) + (state if v.get("offload_optimizer") else 0))


def free_everything() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    try:  # numba defers freeing its (mapped host) allocations: free them now, before the next row pins its own
        from numba import cuda

        cuda.current_context().deallocations.clear()
    except Exception:
        pass


def run_row(name, mode, variant, method, accum, seq_len, micro_batch, steps, warmup, recompute, chunk):
    """-> dict of measurements. Everything it builds is dropped when it returns."""
    from surogate.cli.param_group import memory_report, param_groups
    from surogate.cli.step import TrainStep
    from surogate.models import LoraConfig, init_model

    arch, config = bench_sft.hf_config(name)
    lora = LoraConfig(rank=16, alpha=32, target_modules=tuple(bench_sft.LORA_TARGETS)) if mode == "lora" else None
    t0 = time.perf_counter()
    model = init_model(config.to_dict() | {"architectures": [arch]}, dtype=torch.bfloat16, device=DEVICE, lora=lora,
                       recompute=recompute)
    options = dict(VARIANTS[variant])
    if method is not None:
        options["offload_method"] = method
    if chunk:
        options["chunk"] = chunk
    groups = param_groups(model.trainable_parameters(), weight_decay=0.0 if mode == "lora" else 0.1, **options)
    mem, mem_text = memory_report(groups)
    notes = []
    train_step = TrainStep(model, groups, micro_batch=micro_batch, seq_len=seq_len, cuda_graphs=True,
                           log=notes.append)
    build_s = time.perf_counter() - t0
    position_ids = torch.arange(seq_len).expand(micro_batch, seq_len).contiguous()
    batches = [dict(input_ids=b[:, :-1].contiguous(), labels=b[:, 1:].contiguous(), position_ids=position_ids)
               for b in bench_sft.make_batches(config.vocab_size, micro_batch, seq_len, 4)]

    def step(i):
        window = [batches[(i * accum + k) % len(batches)] for k in range(accum)]
        loss_sum, valid, _ = train_step(window, lr=1e-5, step=i + 1)
        return loss_sum / valid

    step_s, peak, loss = bench_sft.time_steps(step, steps, warmup)
    opt_times = []  # the optimizer step alone (its graph replayed; the grads are zero, the work is the same)
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        train_step._run_optimizer()
        torch.cuda.synchronize()
        opt_times.append(time.perf_counter() - t)
    opt_s = statistics.median(opt_times)
    return dict(step_s=step_s, peak_gib=peak, loss=loss, opt_s=opt_s, micro_s=max(step_s - opt_s, 0.0) / accum,
                build_s=build_s, memory=mem, memory_text=mem_text, notes=notes,
                graphs=train_step._optimizer_graph is not None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="default", help="default, or model:mode:variant[:method[:accum]],...")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-full", type=int, default=1)
    parser.add_argument("--micro-batch-lora", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help=">= 2: the first step warms up, the second captures")
    parser.add_argument("--project-accum", type=int, default=16)
    parser.add_argument("--recompute", default=None, help="e.g. block")
    parser.add_argument("--chunk", type=int, default=0, help="stream: parameters per chunk (default offload.CHUNK)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining rows after this")
    parser.add_argument("--out", default="benchmarks/sft.csv")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.rows == "default":
        rows = DEFAULT_ROWS
    else:
        rows = []
        for spec in args.rows.split(","):
            parts = spec.split(":") + [None, None]
            rows.append((parts[0], parts[1], parts[2], parts[3] or None, int(parts[4] or 1)))
    gpu = torch.cuda.get_device_name()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    start = time.perf_counter()
    results = []
    print(f"# {gpu}; seq_len {args.seq_len}, micro-batch full {args.micro_batch_full} / LoRA {args.micro_batch_lora};"
          f" {args.steps} timed steps after {args.warmup}; host memory available {host_available_bytes() / 1e9:.0f} GB")
    print(f"{'model':9} {'mode':4} {'variant':29} {'method':9} {'acc':>3} {'tok/s':>7} {'step ms':>8} {'opt ms':>7} "
          f"{'peak GiB':>8} {'host GB':>7} {f'tok/s@{args.project_accum}':>9}  notes")
    for name, mode, variant, method, accum in rows:
        record = dict(model=name, mode=mode, variant=variant, method=method or "", accum=accum)
        label = f"{name:9} {mode:4} {variant:29} {(method or '-'):9} {accum:3d}"
        need, available = pinned_bytes_needed(name, mode, variant), host_available_bytes()
        if time.perf_counter() - start > args.budget_s:
            record["status"] = "skipped: time budget"
        elif need and need > 0.9 * available:
            record["status"] = f"skipped: needs {need / 1e9:.0f} GB pinned host memory, {available / 1e9:.0f} GB free"
        if "status" in record:
            print(f"{label} {record['status']}")
            results.append(record)
            continue
        micro_batch = args.micro_batch_full if mode == "full" else args.micro_batch_lora
        torch.cuda.reset_peak_memory_stats()
        try:
            m = run_row(name, mode, variant, method, accum, args.seq_len, micro_batch, args.steps, args.warmup,
                        args.recompute, args.chunk)
        except torch.cuda.OutOfMemoryError as e:
            record["status"] = "oom"
            record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"{label} OOM (peak {record['peak_gib']:.1f} GiB): {str(e).splitlines()[0][:120]}")
        except Exception as e:  # a failure of one row (e.g. pinned allocation refused): record it, go on
            record["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"{label} {record['status']}")
        else:
            tokens = args.seq_len * micro_batch
            acc = args.project_accum
            projected = acc * tokens / (acc * m["micro_s"] + m["opt_s"])
            record.update(status="ok", micro_batch=micro_batch, tokens_per_s=accum * tokens / m["step_s"],
                          projected_tokens_per_s=projected, project_accum=acc,
                          host_bytes=sum(m["memory"]["host"].values()),
                          **{k: v for k, v in m.items() if k != "memory"}, memory=m["memory"])
            print(f"{label} {record['tokens_per_s']:7.0f} {m['step_s'] * 1e3:8.1f} {m['opt_s'] * 1e3:7.1f} "
                  f"{m['peak_gib']:8.2f} {record['host_bytes'] / 1e9:7.1f} {projected:9.0f}  "
                  f"{'; '.join(([] if m['graphs'] else ['optimizer step not captured']) + m['notes'])}")
        finally:
            free_everything()
        results.append(record)
        write(results, args, gpu, command)
    summarise(results, args)
    write(results, args, gpu, command)


def summarise(results, args) -> None:
    """The 8B target: offload_both tokens/s against the no-offload tokens/s estimated from the 4B shape with the
    same optimizer states (fp32 AdamW: "none"; 8-bit: "adamw_8bit")."""
    def find(model, mode, variant, method=""):
        return next((r for r in results if (r["model"], r["mode"], r["variant"], r["method"]) == (model, mode, variant,
                                                                                                   method)
                     and r.get("status") == "ok"), None)

    ratio = (bench_sft.model_flops_per_token("qwen3-4b", args.seq_len, "full")
             / bench_sft.model_flops_per_token("qwen3-8b", args.seq_len, "full"))
    n4, _ = bench_sft.count_params("qwen3-4b")
    n8, _ = bench_sft.count_params("qwen3-8b")
    for states, base_variant in (("", "none"), ("adamw_8bit+", "adamw_8bit")):
        base = find("qwen3-4b", "full", base_variant)
        rows = [r for r in results if (r["model"], r["mode"], r["variant"]) == ("qwen3-8b", "full",
                                                                                states + "offload_both")
                and r.get("status") == "ok"]
        if base is None or not rows:
            print(f"# 8B target ({states or 'fp32 '}states): needs the 4B full {base_variant} row and an 8B "
                  f"{states}offload_both row")
            continue
        tokens = args.seq_len * base["micro_batch"]
        for row in rows:
            for acc in (row["accum"], args.project_accum):
                # 8B without offload, estimated: the 4B micro-step scaled by FLOPs, the resident optimizer by params
                est = acc * tokens / (acc * base["micro_s"] / ratio + base["opt_s"] * n8 / n4)
                got = (row["tokens_per_s"] if acc == row["accum"] else
                       acc * tokens / (acc * row["micro_s"] + row["opt_s"]))
                kind = "measured" if acc == row["accum"] else "projected"
                print(f"# 8B full, {states}offload_optimizer + offload_master ({row['method']}), accumulation {acc}: "
                      f"{got:.0f} tok/s ({kind}) vs {est:.0f} estimated without offload (from 4B {base_variant}): "
                      f"{100 * got / est:.0f}% (target >= 60%: {'met' if got >= 0.6 * est else 'not met'}); "
                      f"peak {row['peak_gib']:.1f} GiB")


def write(results, args, gpu, command) -> None:
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(gpu=gpu, command=command, args=vars(args), rows=results), f, indent=1, default=str)
    if not args.out:
        return
    written = getattr(write, "written", 0)  # append only the rows not written yet
    new_rows = results[written:]
    write.written = len(results)
    csv_rows = []
    for r in new_rows:
        if r.get("status") not in ("ok", "oom"):
            continue
        method = ":" + r["method"] if r["method"] else ""
        accum = f" x{r['accum']}" if r["accum"] > 1 else ""
        ok = r["status"] == "ok"
        mfu = ""
        if ok:
            flops = bench_sft.model_flops_per_token(r["model"], args.seq_len, r["mode"])
            mfu = round(r["tokens_per_s"] * flops / (bench_sft.H100_BF16_PEAK_TFLOPS * 1e12), 4)
        csv_rows.append(dict(date=datetime.date.today().isoformat(), gpu=gpu,
                             framework=f"surogate[{r['variant']}{method}{accum}]", model=r["model"], mode=r["mode"],
                             recipe="bf16", seq_len=args.seq_len,
                             micro_batch=r.get("micro_batch", args.micro_batch_full if r["mode"] == "full"
                                               else args.micro_batch_lora),
                             tokens_per_s=round(r["tokens_per_s"]) if ok else "oom",
                             step_ms=round(r["step_s"] * 1e3, 2) if ok else "",
                             peak_gib=round(r["peak_gib"], 2), mfu=mfu, command=command))
    append_rows(args.out, csv_rows)


if __name__ == "__main__":
    main()
