"""The training loop of `surogate sft` and `surogate pt`: setup -> loop -> save, top to bottom.

One optimizer step = gradient_accumulation_steps micro-batches of [per_device_train_batch_size, sequence_len]
packed rows (static shapes: the step can later be captured as CUDA graphs). The loss of a step is the sum of
token cross-entropies over the whole accumulation window divided by the window's number of trained tokens,
counted on the host from the labels BEFORE the forward passes, so each micro-batch backpropagates
loss_sum / n_window and the accumulated gradient is exactly the gradient of the window's mean loss, however the
trained tokens are spread over the micro-batches.

Data order: the rows of the token shard form one endless stream, epoch after epoch, each epoch in its own seeded
permutation (seed + epoch). Step s trains on rows [s * R, (s + 1) * R) of the stream (R = rows per step), so the
data position of a run is its step: resuming at step s reads exactly the rows the uninterrupted run would have.

The step itself (forward + backward of each micro-batch into flat gradient buffers, global grad norm, clip factor
and fused AdamW on the device, optionally replayed as CUDA graphs) is surogate.cli.step.TrainStep. Host syncs per
step: one, for the step line (loss and grad norm).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import attrs
import numpy as np

from . import checkpoint
from .config import QLORA_FORMATS, Config, check_supported, load_config, recompute_flags, to_dict, write_resolved
from .data import PreparedData, Tokenizer, prepare
from .errors import CheckpointError, NotSupportedYet, UserError
from .evaluate import eval_loss, exact_match
from .report import RunLog, first_step_memory, peak_flops, peak_memory_gb
from .schedule import lr_at, warmup_steps

# Tests stop a run as Ctrl-C would, after this many optimizer steps (kill-and-resume equals an uninterrupted run).
INTERRUPT_ENV = "SUROGATE_TEST_INTERRUPT_AFTER_STEP"


def run(args, command: str) -> int:
    from .distributed import guard

    with guard():  # under mpirun: an error on any rank ends the whole job, naming the rank
        cfg = load_config(args.config, args.overrides, command=command)
        return train(cfg, command)


# ------------------------------------------------------------------------------------------------------ setup
@attrs.define
class Plan:
    """How much is trained: rows per step, steps per epoch, total steps."""

    micro_batch: int
    accumulation: int
    sequence_len: int
    n_rows: int
    max_steps: int
    world_size: int = 1  # data-parallel processes: a step's window holds every rank's rows

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.sequence_len

    def epoch_progress(self, steps_done: int) -> tuple[int, float]:
        """(epoch, fraction of it done) after `steps_done` steps."""
        rows = steps_done * self.rows_per_step
        return rows // self.n_rows, (rows % self.n_rows) / self.n_rows


def _plan(cfg: Config, data: PreparedData, world_size: int = 1) -> Plan:
    n_rows = data.train.n_rows
    rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    max_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * n_rows / rows_per_step))
    return Plan(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.sequence_len, n_rows, max_steps,
                world_size)


class Batches:
    """Rows of the endless seeded stream (see the module doc), read from the memory-mapped shard."""

    def __init__(self, shard, plan: Plan, seed: int):
        self.shard, self.plan, self.seed = shard, plan, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.plan.n_rows)}
        return self._perms[epoch]

    def rows(self, step: int) -> np.ndarray:
        """Row indices of step `step`: [accumulation, world_size * micro_batch] (each rank takes its columns)."""
        first = step * self.plan.rows_per_step
        stream = np.arange(first, first + self.plan.rows_per_step)
        idx = np.array([self._perm(int(k) // self.plan.n_rows)[int(k) % self.plan.n_rows] for k in stream])
        return idx.reshape(self.plan.accumulation, -1)

    def micro_batches(self, rows: np.ndarray) -> list[dict]:
        """CPU tensors input_ids, labels, position_ids [micro_batch, sequence_len] per micro-batch."""
        import torch

        out = []
        for micro in rows:
            order = np.argsort(micro)  # memmap reads in file order, then back to the step's order
            back = np.argsort(order)
            out.append({name: torch.from_numpy(np.asarray(a[micro[order]], dtype=np.int64)[back])
                        for name, a in (("input_ids", self.shard.input_ids), ("labels", self.shard.labels),
                                        ("position_ids", self.shard.position_ids))})
        return out


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _prepare_output_dir(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror or e})", key="output_dir",
                        fix="choose a folder you can write to, e.g. output_dir: ./output") from None
    checkpoint.remove_partial(out)
    return out


def _check_model_folder(cfg: Config) -> None:
    """Fail before tokenising when the model folder is missing or its config.json unusable (the weights are
    checked when they are loaded)."""
    from surogate.models import ModelConfig

    if not Path(cfg.model).is_dir():
        raise UserError(f"model folder not found: {cfg.model}", key="model",
                        fix="point model at a Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    ModelConfig.from_hf(cfg.model)  # ModelError for a missing / invalid config.json or an unsupported architecture


def _model_options() -> frozenset:
    """Keyword arguments of surogate.models.load_pretrained: recipe and qlora exist only in versions that have them."""
    import inspect

    from surogate.models import load_pretrained

    return frozenset(inspect.signature(load_pretrained).parameters)


def _load_model(cfg: Config, device):
    import torch

    from surogate.models import LoraConfig, load_pretrained

    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[cfg.torch_dtype]
    lora = None
    if cfg.lora:
        targets = cfg.lora_target_modules
        lora = LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules=targets if isinstance(targets, str) else tuple(targets),
                          use_rslora=cfg.use_rslora)
    flags = {f"recompute_{k}": v for k, v in recompute_flags(cfg).items() if k != "lora"}
    extra = {}  # only non-default values: versions of surogate.models without recipes / QLoRA take none of these
    if cfg.recipe != "bf16":
        extra["recipe"] = _recipe(cfg)
    qlora = [fmt for key, fmt in QLORA_FORMATS.items() if getattr(cfg, key)]
    if qlora:
        extra["qlora"] = qlora[0]
        extra["qlora_options"] = {"fp8": {"tile": cfg.qlora_block_size}, "nvfp4": {},
                                  "nf4": {"block_size": cfg.qlora_bnb_block_size,
                                          "double_quant": cfg.qlora_bnb_double_quant}}[qlora[0]]
    if cfg.offload_residual:
        extra["offload_residual"] = True
    if cfg.offload_weights:
        extra["offload_weights"] = True
    model = load_pretrained(cfg.model, dtype=dtype, device=device, lora=lora, recompute=flags, **extra)
    model.train()
    return model, dtype


def nvfp4_bf16_last_layers(n_layers: int) -> int:
    """nvfp4's default skip_quant_last_layers: 15% of the layers, at least 1 (28 layers -> 4, the reference's fp4
    runs; the NVFP4 paper keeps about 15% in BF16). With every layer in NVFP4 16x16 weight tiles, small models stall
    (the quickstart's 2-layer model ends at 0.23 where BF16 reaches 0.001: benchmarks/quant_curves_summary.csv)."""
    return max(1, round(0.15 * n_layers))


def _recipe(cfg: Config):
    """The run's surogate.quant.Recipe (cfg.recipe is not bf16): its layers kept in BF16, amax history, margin."""
    from surogate.models import ModelConfig
    from surogate.quant import Recipe

    n_layers = ModelConfig.from_hf(cfg.model).num_layers
    last = cfg.skip_quant_last_layers
    if last is None:
        last = min(nvfp4_bf16_last_layers(n_layers), n_layers - cfg.skip_quant_first_layers) \
            if cfg.recipe == "nvfp4" else 0
    if cfg.skip_quant_first_layers + last > n_layers:
        raise UserError(f"skip_quant_first_layers ({cfg.skip_quant_first_layers}) + skip_quant_last_layers "
                        f"({last}) exceed the model's {n_layers} layers",
                        key="skip_quant_last_layers", fix=f"keep their sum at most {n_layers}")
    return Recipe(cfg.recipe, n_layers=n_layers, skip_quant_first_layers=cfg.skip_quant_first_layers,
                  skip_quant_last_layers=last, amax_history_len=cfg.fp8_amax_history,
                  margin=cfg.fp8_margin, fp4_disable_2d_quantization=cfg.fp4_disable_2d_quantization)


def _flops_per_token(model, trains_base: bool, seq: int) -> float:
    """Matmul FLOPs per trained token: 6 N (forward 2 N, backward 4 N) for full fine-tuning, 4 N with frozen base
    weights (no weight gradients), N = matmul parameters; plus attention 12 * layers * q_width * seq / 2 (causal)."""
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in name)
    if c.tie_word_embeddings:
        n += model.model.embed_tokens.weight.numel()
    attention = 6 * c.num_layers * c.q_size * seq
    return (6 if trains_base else 4) * n + attention


def _layout(named_params) -> dict:
    """Names and shapes of the trainable parameters in TrainStep's two groups (matrices, then vectors): a
    checkpoint's optimizer buffers are only loaded into the same layout."""
    return {"decay": [[n, list(p.shape)] for n, p in named_params if p.dim() >= 2],
            "no_decay": [[n, list(p.shape)] for n, p in named_params if p.dim() < 2]}


def _optimizer_tensors(groups) -> dict:
    return {f"group{i}.{k}": v for i, g in enumerate(groups) for k, v in g.state_dict().items()}


def _resume(cfg: Config, log: RunLog, groups, layout: dict, compat: dict, path: Path | None) -> int:
    """Load a checkpoint into the optimizer (master weights -> parameters) and the RNG; -> the step to start at."""
    if path is None:
        return 0
    state, tensors, rng = checkpoint.load(path)
    checkpoint.check_compatible(path, state["compat"], compat, state["layout"], layout)
    for i, g in enumerate(groups):  # fp32 master -> the parameters (rounded once to the model dtype)
        g.load_state_dict({k: tensors[f"group{i}.{k}"].to(g.master.device) for k in g.state_dict()})
    checkpoint.set_rng_state(rng)
    log.info(f"resumed from {path} at step {state['step']}")
    return int(state["step"])


def _save_final(model, tokenizer: Tokenizer, cfg: Config, out: Path) -> Path:
    """The trained model as a Hugging Face folder (full) or a peft adapter (LoRA), with the tokenizer files;
    written to a temporary folder and renamed."""
    import shutil

    final = out / ("adapter" if cfg.lora else "model")
    tmp = out / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if cfg.lora:
        model.save_adapter(tmp)
    else:
        model.save_pretrained(tmp)
    tokenizer.save(tmp)
    checkpoint.replace_dir(tmp, final)
    return final


def _sigterm_as_interrupt():
    """A scheduler's SIGTERM stops the run like Ctrl-C: cleanly, nothing half-written. -> the previous handler."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------------ train
def train(cfg: Config, command: str) -> int:
    import torch

    from .distributed import Processes, QuietLog, unsupported_launch_processes
    from .param_group import memory_report, param_groups

    check_supported(cfg, device=_device().type, world_size=unsupported_launch_processes(),
                    model_options=_model_options())
    # world size 1 (no MPI) unless launched by mpirun
    procs = Processes.start(_device(), cfg.zero_level, offload_grads=cfg.offload_grads)
    device = procs.device
    out = _prepare_output_dir(cfg) if procs.is_main else Path(cfg.output_dir)
    resume_path = checkpoint.resolve(cfg)
    if resume_path is None and checkpoint.list_checkpoints(out):
        raise CheckpointError("output_dir holds checkpoints of an earlier run; starting afresh would mix them with "
                              "this run's", key="resume_from_checkpoint", file=str(out),
                              fix="set resume_from_checkpoint: true to continue that run, or choose a new output_dir")
    resume_state = checkpoint.load(resume_path)[0] if resume_path else None
    log = (RunLog if procs.is_main else QuietLog)(  # rank 0 alone prints and writes metrics
        out, report_to=cfg.report_to, run_name=cfg.run_name or out.resolve().name, config=to_dict(cfg),
        resume_step=resume_state["step"] if resume_state else 0, wandb_project=cfg.wandb_project)
    if procs.is_main:
        write_resolved(cfg, out)
    log.rule(f"surogate {command}: {cfg.model} -> {out} on {device.type}")
    if procs.world_size > 1:
        log.info(procs.describe())

    # data: tokenised once, reused while config, files and tokenizer are unchanged
    _check_model_folder(cfg)
    tokenizer = Tokenizer(cfg.model, cfg.chat_template)
    with procs.main_first():  # rank 0 tokenises; the others then reuse output_dir/tokenized
        data = prepare(cfg, tokenizer, command, log=log.info)
    plan = _plan(cfg, data, procs.world_size)

    # model and optimizer: the seed fixes the LoRA init (and dropout); the optimizer binds the trainable
    # parameters to its flat buffers
    torch.manual_seed(cfg.seed)
    model, dtype = _load_model(cfg, device)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{model.config.vocab_size}", file=str(Path(cfg.model) / "config.json"),
                        fix="use the tokenizer that belongs to this model")
    named = model.trainable_parameters()
    layout = _layout(named)
    if procs.world_size > 1 and procs.zero_level >= 1 and (cfg.optimizer != "adamw" or cfg.offload_optimizer
                                                           or cfg.offload_master):
        raise NotSupportedYet(f"optimizer {cfg.optimizer}, offload_optimizer {cfg.offload_optimizer}, offload_master "
                              f"{cfg.offload_master} with zero_level {procs.zero_level} (sharded fp32 AdamW only)",
                              key="zero_level", fix="zero_level: 0 (each rank keeps the whole optimizer), or "
                              "optimizer: adamw with offload_optimizer: false and offload_master: false")
    # the parameters become views into flat buffers; the optimizer states (fp32 or 8-bit) and the fp32 master live
    # on the device or, offloaded, in pinned host memory
    groups = param_groups(named, cfg.weight_decay, optimizer=cfg.optimizer, offload_master=cfg.offload_master,
                          offload_optimizer=cfg.offload_optimizer,
                          offload_method="zero_copy" if cfg.use_zero_copy else "stream")
    n_total = sum(p.numel() for p in model.parameters())
    n_trained = sum(g.work.numel() for g in groups)
    log.info(f"model: {model.config.architecture}, "
             f"{n_total / 1e6:.2f}M parameters, {n_trained / 1e6:.3f}M trained "
             f"({'LoRA r=' + str(cfg.lora_rank) if cfg.lora else 'full'}), {str(dtype).replace('torch.', '')}")
    log.info(f"memory: {model.memory_report()}")  # says what the recipe does on this GPU (e.g. NVFP4 on SM < 100)
    log.info(memory_report(groups)[1])  # trained weights, grads, master, optimizer state: device and pinned host
    if cfg.offload_master and dtype == torch.float32:
        log.info("offload_master: the trained weights are float32 and are their own master copy: nothing to offload")
    data_hash = data.train.header["hash"]
    compat = checkpoint.compat_values(cfg, str(dtype), data_hash)
    if procs.world_size > 1:  # the data stream depends on it
        compat["world_size"] = procs.world_size
    # data parallel: rank 0's weights everywhere; ZeRO shards the optimizer (1), grads (2), weights (3: per layer)
    groups = procs.shard_groups(groups, model)
    if procs.zero_level > 0:
        log.info(f"per rank, sharded: {memory_report(groups)[1]}")  # what ZeRO (and offload_grads) leave each GPU
    start = _resume(cfg, log, groups, layout, compat, resume_path)
    if resume_path is not None:  # fp8-hybrid's amax histories and scales, nvfp4's SR step: as the run left them
        model.load_recipe_state_dict(checkpoint.load_recipe(resume_path))
    graphs = device.type == "cuda" and cfg.use_cuda_graphs is not False
    if cfg.use_cuda_graphs and device.type != "cuda":
        log.info("use_cuda_graphs: no CUDA device, the step runs eagerly")
    train_step = procs.train_step(model, groups, micro_batch=cfg.per_device_train_batch_size, seq_len=cfg.sequence_len,
                           betas=(cfg.adamw_beta1, cfg.adamw_beta2), eps=cfg.adamw_epsilon,
                           max_grad_norm=cfg.max_grad_norm, cuda_graphs=graphs, seed=cfg.seed, log=log.info)

    batches = Batches(data.train, plan, cfg.seed)
    epochs = plan.max_steps * plan.rows_per_step / plan.n_rows
    log.info(f"plan: {plan.max_steps} steps x {plan.rows_per_step} rows of {plan.sequence_len} tokens "
             f"({plan.tokens_per_step} tokens/step, {epochs:.2f} epochs of {plan.n_rows} rows); warmup "
             f"{warmup_steps(cfg, plan.max_steps)}, {cfg.lr_scheduler_type} schedule, peak lr {cfg.learning_rate:g}")
    flops_per_step = _flops_per_token(model, not cfg.lora, plan.sequence_len) * plan.tokens_per_step
    peak = peak_flops(device)
    if peak:  # MFU of the whole world: every GPU's peak
        peak *= procs.world_size
    checkpoint_state = {"compat": compat, "layout": layout}
    interrupt_after = int(os.environ.get(INTERRUPT_ENV, "-1"))
    previous_sigterm = _sigterm_as_interrupt()
    last_eval_step = -1
    since_eval: list[float] = []

    def evaluate(step: int) -> float | None:
        nonlocal last_eval_step
        if data.eval is None or last_eval_step == step or not procs.evaluates:  # ZeRO-3: every rank (gathers)
            return None
        loss, tokens = eval_loss(model, data.eval, batch_size=cfg.per_device_eval_batch_size,
                                 max_batches=cfg.eval_num_steps, device=device)
        train_loss = sum(since_eval) / len(since_eval) if since_eval else None
        log.eval({"step": step, "eval_loss": loss, "eval_tokens": tokens, "train_loss": train_loss})
        since_eval.clear()
        last_eval_step = step
        return loss

    # ------------------------------------------------------------------------------------------ the loop
    log.start_progress(plan.max_steps, start)
    step = start
    if device.type == "cuda":  # the first step's peak, over what it starts with (first_step_memory)
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t_start = time.perf_counter()
    try:
        while step < plan.max_steps:
            if step == interrupt_after:
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, plan.max_steps)
            # every micro-batch backpropagates loss_sum / (trained tokens of the whole window), counted on the host
            # from the labels first; grads accumulate in place in flat buffers; then norm, clip and AdamW
            rows = procs.shard_rows(batches.rows(step))  # this rank's [accumulation, micro_batch]
            loss_sum, n_window, norm = train_step(batches.micro_batches(rows), lr=lr, step=step + 1)
            model.after_optimizer_step()  # fp8-hybrid: amax history -> next scales; nvfp4: next SR seed (device ops)
            step += 1

            loss = loss_sum.item() / max(1, n_window)  # the step's one host sync
            dt = time.perf_counter() - t0
            epoch, frac = plan.epoch_progress(step)
            since_eval.append(loss)
            if frac == 0.0 and epoch > 0:  # the step that ends an epoch shows it at 100%
                epoch, frac = epoch - 1, 1.0
            log.step({"step": step, "epoch": epoch, "epoch_progress": frac,
                      "loss": loss, "grad_norm": float(norm), "lr": lr, "trained_tokens": n_window,
                      "tok_per_s": plan.tokens_per_step / dt, "step_time_s": dt,
                      "mfu": flops_per_step / dt / peak if peak else None, "mem_gb": peak_memory_gb(device)},
                     total=plan.max_steps, print_line=step % cfg.logging_steps == 0 or step == plan.max_steps)
            log.advance()
            if step == start + 1:
                host = sum(memory_report(groups)[0]["host"].values()) + model.offloaded_bytes()
                log.info(first_step_memory(device, resident, host))
            if not math.isfinite(loss):
                raise UserError(f"the loss became {loss} at step {step}", key="learning_rate",
                                fix="lower learning_rate, or set max_grad_norm (e.g. 1.0)")
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < plan.max_steps:
                evaluate(step)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < plan.max_steps:
                tensors = _optimizer_tensors(groups)  # collective under ZeRO: every rank gathers, rank 0 writes
                if not procs.is_main:
                    continue
                path = checkpoint.save(out, step, optimizer_tensors=tensors,
                                       state={**checkpoint_state, "rows_consumed": step * plan.rows_per_step},
                                       recipe_tensors=model.recipe_state_dict(),
                                       keep=cfg.save_total_limit)
                log.info(f"checkpoint: {path}")
                log.plot()
    except KeyboardInterrupt:
        log.stop_progress()
        procs.shutdown()  # every rank stops at the same step (the test hook; Ctrl-C reaches all ranks)
        done = checkpoint.list_checkpoints(out)
        where = f"the newest complete checkpoint is {done[-1]}" if done else "no checkpoint was written"
        log.info(f"interrupted after step {step}: {where}. Continue with: surogate {command} <config> "
                 "resume_from_checkpoint=true")
        log.plot()
        log.close()
        return 130
    finally:
        _restore_sigterm(previous_sigterm)
        log.stop_progress()
    train_time = time.perf_counter() - t_start

    # ------------------------------------------------------------------------------------------ the end
    final_eval = evaluate(step)
    procs.unshard(model)  # ZeRO-3: the trained weights into rank 0's model (collective)
    procs.shutdown()
    if not procs.is_main:  # rank 0 alone writes the model and runs the final evaluation
        log.close()
        return 0
    saved = _save_final(model, tokenizer, cfg, out)
    result = {"step": step, "train_time_s": train_time, "eval_loss": final_eval}
    if cfg.eval_exact_match_samples and data.eval_prompts:
        prompts = data.eval_prompts[: cfg.eval_exact_match_samples]
        accuracy, answers = exact_match(model, tokenizer, prompts, max_new_tokens=cfg.eval_max_new_tokens,
                                        device=device)
        for question, answer, ref in answers[:3]:
            log.info(f"  {question!r} -> {answer!r} (expected {ref!r})")
        log.console.print(f"[bold]exact match: {100 * accuracy:.1f}% of {len(answers)} held-out prompts[/bold]")
        result["exact_match"] = accuracy
    log.final(result)
    log.plot()
    log.info(f"done: {step} steps in {train_time:.1f} s; wrote {saved}, {out / 'metrics.jsonl'}, "
             f"{out / 'training_plot.png'}")
    log.close()
    return 0
