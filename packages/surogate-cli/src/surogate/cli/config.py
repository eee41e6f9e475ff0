"""The YAML config: attrs classes with a default and a one-line doc per key, checked all at once.

`load_config(path, overrides, command)` reads the YAML, replaces `${VAR}` / `${VAR:-default}` from the environment,
applies `key=value` overrides (dotted paths, `datasets.0.path=...`), converts every value to its declared type and
checks ranges and combinations. Every problem found is collected and raised together as one ConfigError whose lines
carry key paths; an unknown key suggests the closest valid one. `write_resolved(cfg, output_dir)` saves the config as
it was used (resolved_config.yaml). No `_component_` paths, no code execution: YAML is parsed with safe_load.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import attrs
import yaml

from .errors import ConfigError, NotSupportedYet

# ------------------------------------------------------------------------------------------------- declarations


def _opt(default: Any, doc: str, *, choices: tuple | None = None, check: tuple | None = None) -> Any:
    """A config key: its default, one line of documentation, optional allowed values and a range check.
    check = (predicate, "must be ...") on the converted value."""
    meta = {"doc": doc, "choices": choices, "check": check}
    if isinstance(default, (list, dict)):
        return attrs.field(factory=lambda d=default: type(d)(d), metadata=meta)
    return attrs.field(default=default, metadata=meta)


_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_FRACTION = (lambda v: 0.0 <= v <= 1.0, "must be between 0 and 1")
_FRACTION_OPEN = (lambda v: 0.0 <= v < 1.0, "must be >= 0 and < 1")
_BETA = (lambda v: 0.0 <= v < 1.0, "must be >= 0 and < 1")

DATASET_TYPES = ("auto", "messages", "sharegpt", "alpaca", "instruction", "conversation", "text")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@attrs.define
class DatasetConfig:
    """One dataset entry of `datasets:` or `validation_datasets:`."""

    path: str = _opt("", "local file (.jsonl .json .parquet .txt), folder of such files, or a Hugging Face Hub id")
    type: str = _opt("auto", "how rows become training text: auto, messages (also ShareGPT from/value), sharegpt, "
                     "alpaca, instruction, conversation, text", choices=DATASET_TYPES)
    subset: str | None = _opt(None, "Hub datasets: the subset (configuration) name")
    split: str = _opt("train", "Hub datasets: the split to load, e.g. train or train[:1000]")
    samples: int | None = _opt(None, "use only the first N rows (after loading, before filtering)", check=_POSITIVE)
    text_field: str = _opt("text", "text: the column holding the raw text")
    messages_field: str = _opt("messages", "messages / conversation: the column holding the list of turns "
                               "(auto also finds `conversations` and `conversation`)")
    message_property_mappings: dict[str, str] = _opt(
        {"role": "role", "content": "content"}, "conversation: which keys of a turn hold its role and its content")
    system_field: str | None = _opt(None, "column holding a per-row system prompt (alpaca, instruction, conversation)")
    system_prompt: str | None = _opt(None, "a fixed system prompt put before every example")
    instruction_field: str = _opt("instruction", "alpaca / instruction: the column holding the instruction")
    input_field: str = _opt("input", "alpaca / instruction: the column holding the optional input")
    output_field: str = _opt("output", "alpaca / instruction: the column holding the answer to train on")
    prompt_format: str = _opt("{instruction}\n{input}", "instruction: the user turn when the input is non-empty")
    prompt_format_no_input: str = _opt("{instruction}", "instruction: the user turn when the input is empty")


@attrs.define
class Config:
    """Everything `surogate sft` / `pt` / `tokenize` reads. Keys follow the reference Surogate's where it has them."""

    # --- model and output
    model: str = _opt("", "Hugging Face model folder: config.json, *.safetensors, tokenizer.json (required)")
    output_dir: str = _opt("output", "where tokenized data, checkpoints, logs and the final model are written")
    run_name: str | None = _opt(None, "a name for this run in logs (default: the output_dir's name)")
    torch_dtype: str = _opt("auto", "weight/compute dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, "
                            "float32", choices=("auto", "bfloat16", "float32"))
    seed: int = _opt(1234, "seed for LoRA init, dropout, the validation split and the data order")

    # --- data
    datasets: list[DatasetConfig] = _opt([], "training datasets (required): a list of {path, type, ...}")
    validation_datasets: list[DatasetConfig] = _opt([], "datasets for eval loss (and eval_exact_match_samples)")
    validation_split_ratio: float | None = _opt(
        None, "fraction of each training dataset held out for eval; default 0.1, or 0 when validation_datasets is "
        "given", check=_FRACTION_OPEN)
    sequence_len: int = _opt(1024, "tokens per packed row; documents are packed into rows of exactly this length",
                             check=_POSITIVE)
    chat_template: str = _opt("auto", "auto (the tokenizer's chat_template, an error if it has none), or one of the "
                              "built-in templates chatml, llama3, qwen3", choices=("auto", "chatml", "llama3", "qwen3"))
    truncation_strategy: str = _opt("delete", "chat documents longer than sequence_len: delete (counted and reported)"
                                    " or truncate. Raw text is always split into sequence_len pieces",
                                    choices=("delete", "truncate"))

    # --- batch and length of training
    per_device_train_batch_size: int = _opt(2, "packed rows per micro-batch", check=_POSITIVE)
    per_device_eval_batch_size: int = _opt(2, "packed rows per eval batch", check=_POSITIVE)
    gradient_accumulation_steps: int = _opt(4, "micro-batches per optimizer step", check=_POSITIVE)
    num_epochs: float = _opt(1.0, "passes over the training rows (used when max_steps is -1)", check=_POSITIVE)
    max_steps: int = _opt(-1, "optimizer steps to run; -1 = derived from num_epochs",
                          check=(lambda v: v == -1 or v > 0, "must be -1 or > 0"))

    # --- optimizer and schedule
    optimizer: str = _opt("adamw", "adamw (fp32 states, 8 bytes a parameter) or adamw_8bit (blockwise 8-bit states, "
                          "2 bytes a parameter)", choices=("adamw", "adamw_8bit"))
    learning_rate: float = _opt(2e-4, "peak learning rate", check=_POSITIVE)
    lr_scheduler_type: str = _opt("linear", "after warmup: linear or cosine decay to final_lr_fraction, wsd (constant,"
                                  " then cooldown), constant", choices=("linear", "cosine", "wsd", "constant"))
    warmup_steps: int = _opt(0, "steps of linear warmup from 0 to learning_rate", check=_NON_NEGATIVE)
    warmup_ratio: float = _opt(0.0, "warmup as a fraction of max_steps (instead of warmup_steps)", check=_FRACTION)
    cooldown_steps: int = _opt(0, "last steps: the lr falls from its value to 0 as 1 - sqrt(progress)",
                               check=_NON_NEGATIVE)
    final_lr_fraction: float = _opt(0.0, "linear / cosine decay ends at learning_rate * final_lr_fraction",
                                    check=_FRACTION)
    weight_decay: float = _opt(0.1, "decoupled AdamW weight decay (matrices only; norms and biases get none)",
                               check=_NON_NEGATIVE)
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this; 0 = no clipping", check=_NON_NEGATIVE)
    adamw_beta1: float = _opt(0.9, "AdamW beta1", check=_BETA)
    adamw_beta2: float = _opt(0.999, "AdamW beta2", check=_BETA)
    adamw_epsilon: float = _opt(1e-8, "AdamW epsilon", check=_POSITIVE)

    # --- LoRA / QLoRA
    lora: bool = _opt(True, "train LoRA adapters (true) or every weight (false; `surogate pt` defaults to false)")
    lora_rank: int = _opt(16, "LoRA rank r", check=_POSITIVE)
    lora_alpha: float = _opt(32.0, "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)",
                             check=_POSITIVE)
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input", check=_FRACTION_OPEN)
    lora_target_modules: str | list[str] = _opt(
        "all-linear", "all-linear, or a list of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj")
    use_rslora: bool = _opt(False, "rank-stabilised LoRA scaling alpha / sqrt(r)")
    qlora_fp8: bool = _opt(False, "QLoRA: base weights stored as FP8 E4M3 in 2-D tiles")
    qlora_fp4: bool = _opt(False, "QLoRA: base weights stored as NVFP4")
    qlora_bnb: bool = _opt(False, "QLoRA: base weights stored as bitsandbytes-style NF4")
    qlora_block_size: int = _opt(128, "qlora_fp8 tile size", choices=(64, 128, 256))
    qlora_bnb_block_size: int = _opt(64, "qlora_bnb block size", choices=(64, 128, 256, 512))
    qlora_bnb_double_quant: bool = _opt(True, "qlora_bnb: quantise the block scales too")

    # --- precision and memory
    recipe: str = _opt("bf16", "matmul recipe: bf16, fp8-hybrid (SM89+), nvfp4 (Blackwell)",
                       choices=("bf16", "fp8-hybrid", "nvfp4"))
    skip_quant_first_layers: int = _opt(0, "recipe fp8-hybrid / nvfp4: the first N transformer layers stay BF16",
                                        check=_NON_NEGATIVE)
    skip_quant_last_layers: int | None = _opt(None, "recipe fp8-hybrid / nvfp4: the last N layers stay BF16; default "
                                              "0 for fp8-hybrid, for nvfp4 15% of the layers, at least 1 (4 of "
                                              "28, as the reference's fp4 runs; the NVFP4 paper ~15%); 0: none",
                                              check=_NON_NEGATIVE)
    fp4_disable_2d_quantization: bool = _opt(False, "nvfp4: weights in 1-D blocks of 16 instead of 16x16 tiles "
                                             "(finer scales; forward and dgrad then quantise W differently)")
    fp8_amax_history: int = _opt(1024, "fp8-hybrid: length of the delayed-scaling amax history (steps)",
                                 check=_POSITIVE)
    fp8_margin: int = _opt(0, "fp8-hybrid: scales keep 2^margin of headroom below the format's maximum",
                           check=_NON_NEGATIVE)
    recompute_block: bool = _opt(False, "recompute the whole block in backward (implies att, ffn, rmsnorm)")
    recompute_att: bool = _opt(False, "recompute attention in backward (implies qkv)")
    recompute_ffn: bool = _opt(False, "recompute the MLP in backward (implies swiglu)")
    recompute_qkv: bool = _opt(False, "recompute the QKV projection in backward")
    recompute_swiglu: bool = _opt(False, "recompute SwiGLU in backward")
    recompute_rmsnorm: bool = _opt(False, "recompute RMSNorm outputs in backward")
    recompute_lora: bool = _opt(False, "recompute LoRA intermediates in backward")
    use_cuda_graphs: bool | None = _opt(None, "capture the training step as CUDA graphs (default: on with a CUDA GPU;"
                                        " no effect on a CPU)")
    zero_level: int = _opt(1, "data parallel under mpirun: 0 plain (replicated), 1 optimizer state sharded, "
                              "2 + gradients, 3 + weights", choices=(0, 1, 2, 3))
    offload_residual: bool = _opt(False, "keep residual activations in host memory")
    offload_weights: bool = _opt(False, "LoRA: keep the frozen base weights in pinned host memory and stream each "
                                 "layer's to the GPU just ahead of use (3 layer slots on the GPU)")
    offload_master: bool = _opt(False, "keep the fp32 master weights in pinned host memory (bf16 weights stay on the "
                                "GPU); the optimizer reads and writes them there")
    offload_optimizer: bool = _opt(False, "keep the AdamW states (fp32 or 8-bit) in pinned host memory")
    use_zero_copy: bool = _opt(False, "offload_master / offload_optimizer: the optimizer kernel reads and writes the "
                               "host memory directly (true), or double-buffered chunks stream through the GPU (false; "
                               "measured faster on the H100: 8B full FT optimizer step 2.45 s vs 2.96 s)")
    offload_grads: bool = _opt(False, "zero_level 2 under mpirun: keep the fp32 gradient shards in pinned host "
                               "memory")

    # --- eval, checkpoints, logging
    eval_steps: int = _opt(100, "eval loss every N steps (and at the end); 0 = only at the end", check=_NON_NEGATIVE)
    eval_num_steps: int = _opt(-1, "eval batches per eval; -1 = the whole validation set",
                               check=(lambda v: v == -1 or v > 0, "must be -1 or > 0"))
    eval_exact_match_samples: int = _opt(0, "at the end, greedily answer this many validation chat prompts and "
                                         "report exact-match accuracy; 0 = off", check=_NON_NEGATIVE)
    eval_max_new_tokens: int = _opt(64, "eval_exact_match_samples: most tokens generated per answer", check=_POSITIVE)
    save_steps: int = _opt(50, "write a checkpoint every N steps; 0 = none (the final model is always written)",
                           check=_NON_NEGATIVE)
    save_total_limit: int = _opt(5, "keep the newest N checkpoints", check=_POSITIVE)
    resume_from_checkpoint: bool | str = _opt(False, "true: resume from the newest checkpoint in output_dir (if any);"
                                              " or a checkpoint folder")
    logging_steps: int = _opt(1, "print the step line every N steps", check=_POSITIVE)
    report_to: list[str] = _opt([], "also log to: tensorboard, wandb (when installed)")
    wandb_project: str = _opt("Surogate", "wandb project name")


COMMAND_DEFAULTS = {
    "pt": {"lora": False, "datasets.type": "text", "validation_datasets.type": "text"},
}

# ------------------------------------------------------------------------------------------------- conversion

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Problems(list):
    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}" if path else message)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_type_name(item)}"
    if origin is dict:
        return "a mapping"
    if attrs.has(tp):
        return "a mapping"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    """value (from YAML) -> tp, or record a problem and return a sentinel."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:  # first member that takes the value without a problem
            trial = _Problems()
            out = _convert(value, arg, path, trial)
            if not trial:
                return out
        problems.add(path, f"must be {_type_name(tp)}, got {value!r}")
        return _BAD
    if tp is type(None):
        if value is None:
            return None
        problems.add(path, f"must be null, got {value!r}")
        return _BAD
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.add(path, f"must be true or false, got {value!r}")
        return _BAD
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.add(path, f"must be an int, got {value!r}")
        return _BAD
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.add(path, f"must be a number, got {value!r}")
        return _BAD
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.add(path, f"must be a string, got {value!r}")
        return _BAD
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.add(path, f"must be {_type_name(tp)}, got {value!r}")
            return _BAD
        return [_convert(v, item, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.add(path, f"must be a mapping, got {value!r}")
            return _BAD
        return {str(k): _convert(v, vt, f"{path}.{k}", problems) for k, v in value.items()}
    if attrs.has(tp):
        return _build(tp, value, path, problems)
    raise TypeError(f"config type {tp} not handled")  # a bug in this file, not a user error


_BAD = object()


def _build(cls: type, data: Any, path: str, problems: _Problems) -> Any:
    if not isinstance(data, dict):
        problems.add(path, f"must be a mapping of keys to values, got {data!r}")
        return _BAD
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(fields)}"
            problems.add(key_path, f"unknown key{hint}")
            continue
        field = fields[key]
        out = _convert(value, hints[key], key_path, problems)
        if out is _BAD or (isinstance(out, list) and any(v is _BAD for v in out)):
            continue
        choices, check = field.metadata.get("choices"), field.metadata.get("check")
        if choices is not None and out is not None and out not in choices:
            close = difflib.get_close_matches(str(out), [str(c) for c in choices], n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.add(key_path, f"must be one of {', '.join(map(str, choices))}, got {out!r}{hint}")
            continue
        if check is not None and out is not None and not check[0](out):
            problems.add(key_path, f"{check[1]}, got {out!r}")
            continue
        kwargs[key] = out
    return cls(**kwargs)


def _interpolate(value: Any, path: str, problems: _Problems) -> Any:
    """${VAR} and ${VAR:-default} in string values. A value that is exactly one reference is re-read as a YAML
    scalar, so `learning_rate: ${LR}` with LR=1e-4 gives a number."""
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.add(path, f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")
        return ""

    out = _ENV.sub(sub, value)
    if _ENV.fullmatch(value):
        try:
            return yaml.safe_load(out) if out.strip() else out
        except yaml.YAMLError:
            return out
    return out


def _apply_override(data: dict, text: str, problems: _Problems) -> None:
    """key=value with a dotted key (integers index lists: datasets.0.path=x); the value is read as YAML."""
    if "=" not in text:
        problems.add(text, "an override must look like key=value, e.g. learning_rate=1e-4")
        return
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                problems.add(key, f"index {part} is out of range (the list has {len(node)} entries)")
                return
            if int(part) == len(node):  # datasets.N.path=... with N = len appends an entry
                node.append([] if nxt.isdigit() else {})
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            problems.add(key, f"index {last} is out of range (the list has {len(node)} entries)")
            return
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        problems.add(key, "cannot set a key inside a non-mapping value")


def _apply_command_defaults(data: dict, command: str | None) -> None:
    for key, value in COMMAND_DEFAULTS.get(command or "", {}).items():
        if "." in key:  # default for every entry of a list of datasets
            list_key, sub = key.split(".", 1)
            for entry in data.get(list_key) or []:
                if isinstance(entry, dict):
                    entry.setdefault(sub, value)
        else:
            data.setdefault(key, value)


def _check_combinations(cfg: Config, problems: _Problems, command: str | None) -> None:
    if not cfg.model:
        problems.add("model", "is required: the path of a Hugging Face model folder")
    if command != "merge" and not cfg.datasets:
        problems.add("datasets", "at least one training dataset is required, e.g. datasets: [{path: train.jsonl}]")
    for group in ("datasets", "validation_datasets"):
        for i, d in enumerate(getattr(cfg, group)):
            if not d.path:
                problems.add(f"{group}[{i}].path", "is required")
            if command == "pt" and d.type not in ("text", "auto"):
                problems.add(f"{group}[{i}].type", f"`surogate pt` trains on raw text: use type text, got {d.type!r}")
    if cfg.warmup_steps > 0 and cfg.warmup_ratio > 0:
        problems.add("warmup_ratio", "give warmup_steps or warmup_ratio, not both")
    if isinstance(cfg.lora_target_modules, str):
        if cfg.lora_target_modules not in ("all-linear", "all"):
            problems.add("lora_target_modules", f"must be all-linear or a list of {', '.join(LORA_MODULES)}, "
                         f"got {cfg.lora_target_modules!r}")
    else:
        for i, m in enumerate(cfg.lora_target_modules):
            if m not in LORA_MODULES and m != "all-linear":
                close = difflib.get_close_matches(m, LORA_MODULES, n=1)
                hint = f"; did you mean `{close[0]}`?" if close else f"; valid: {', '.join(LORA_MODULES)}"
                problems.add(f"lora_target_modules[{i}]", f"unknown module {m!r}{hint}")
        if not cfg.lora_target_modules:
            problems.add("lora_target_modules", "must name at least one module")
    qlora = [k for k in ("qlora_fp8", "qlora_fp4", "qlora_bnb") if getattr(cfg, k)]
    if len(qlora) > 1:
        problems.add(qlora[1], f"choose one QLoRA mode, got {' and '.join(qlora)}")
    if qlora and not cfg.lora:
        problems.add(qlora[0], "QLoRA trains LoRA adapters on a quantised base: set lora: true")
    if cfg.offload_weights and (not cfg.lora or qlora or cfg.recipe != "bf16"):
        problems.add("offload_weights", "streams the frozen bf16 base weights of LoRA training: it needs lora: true, "
                     "no QLoRA mode and recipe: bf16 (or set offload_weights: false)")
    if cfg.offload_weights and cfg.zero_level == 3:
        problems.add("offload_weights", "and zero_level 3 both decide where weights live: use zero_level 0-2 with "
                     "offload_weights (with LoRA, ZeRO-3 shards only the adapters)")
    if cfg.offload_residual and not cfg.recompute_block:
        problems.add("offload_residual", "keeps each layer's input residual in host memory, which is all a layer "
                     "keeps only with recompute_block: set recompute_block: true (or offload_residual: false)")
    for i, r in enumerate(cfg.report_to):
        if r not in ("tensorboard", "wandb"):
            problems.add(f"report_to[{i}]", f"must be tensorboard or wandb, got {r!r}")


def load_config(path: str | os.PathLike, overrides: list[str] | tuple = (), command: str | None = None) -> Config:
    """Read, interpolate, override, convert and check a YAML config. Raises ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path} (give the path of a YAML file, e.g. "
                           f"examples/quickstart/sft.yaml)"], file=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"invalid YAML{where}: {problem}"], file=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], file=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of keys to values, got {type(data).__name__}"],
                          file=str(path))
    problems = _Problems()
    data = _interpolate(data, "", problems)
    for text in overrides:
        _apply_override(data, text, problems)
    _apply_command_defaults(data, command)
    cfg = _build(Config, data, "", problems)
    if cfg is not _BAD:
        _check_combinations(cfg, problems, command)
    if problems:
        raise ConfigError(problems, file=str(path))
    cfg.model = _resolve_path(cfg.model, path.parent)
    for d in [*cfg.datasets, *cfg.validation_datasets]:
        d.path = _resolve_path(d.path, path.parent)
    return cfg


def _resolve_path(value: str, base: Path) -> str:
    """A relative model / dataset path is taken relative to the YAML's folder when it exists there, else relative
    to the current directory (so a config can ship beside its data and still name files of the working folder)."""
    p = Path(value).expanduser()
    if p.is_absolute() or not (base / p).exists():
        return str(p)
    return str(base / p)


def validation_split_ratio(cfg: Config) -> float:
    if cfg.validation_split_ratio is not None:
        return cfg.validation_split_ratio
    return 0.0 if cfg.validation_datasets else 0.1


def recompute_flags(cfg: Config) -> dict[str, bool]:
    return {name: getattr(cfg, f"recompute_{name}") for name in ("block", "att", "ffn", "qkv", "swiglu", "rmsnorm",
                                                                 "lora")}


QLORA_FORMATS = {"qlora_fp8": "fp8", "qlora_fp4": "nvfp4", "qlora_bnb": "nf4"}  # key -> surogate.models format


def check_supported(cfg: Config, *, device: str, world_size: int = 1, model_options: frozenset = frozenset()
                    ) -> None:
    """Values this version accepts in the config but cannot run yet: a clear error, never a silent fallback.
    model_options: the keyword arguments surogate.models.load_pretrained takes (recipe, qlora when it has them)."""
    missing = []
    if cfg.recipe != "bf16" and "recipe" not in model_options:
        missing.append(("recipe", cfg.recipe, "recipe: bf16"))
    for key in QLORA_FORMATS:
        if getattr(cfg, key) and "qlora" not in model_options:
            missing.append((key, "true", f"{key}: false (plain LoRA)"))
    if cfg.offload_residual and "offload_residual" not in model_options:
        missing.append(("offload_residual", "true", "offload_residual: false"))
    if cfg.offload_weights and "offload_weights" not in model_options:
        missing.append(("offload_weights", "true", "offload_weights: false"))
    if cfg.offload_grads and cfg.zero_level != 2:  # the ZeRO-2 gradient shards are what goes to host memory
        missing.append(("offload_grads", f"true with zero_level {cfg.zero_level}",
                        "zero_level: 2 under mpirun -n N (the fp32 gradient shards then live in host memory), "
                        "or offload_grads: false"))
    if cfg.recompute_lora:
        missing.append(("recompute_lora", "true", "recompute_lora: false"))
    if world_size > 1:
        missing.append(("a launch without MPI (torchrun)", f"{world_size} processes",
                        f"launch with mpirun -n {world_size} (surogate bootstraps data parallelism from MPI)"))
    if missing:
        lines = "; ".join(f"{key}: {value}" for key, value, _ in missing)
        fixes = "; ".join(fix for _, _, fix in missing)
        raise NotSupportedYet(f"not supported yet in this version: {lines} (device {device})", fix=fixes)


def to_dict(cfg: Config) -> dict:
    return attrs.asdict(cfg, recurse=True)


def write_resolved(cfg: Config, output_dir: str | os.PathLike) -> Path:
    """output_dir/resolved_config.yaml: every key with the value used (defaults included)."""
    out = Path(output_dir) / "resolved_config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text("# the config as resolved by surogate (defaults, ${ENV} and overrides applied)\n"
                   + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, out)
    return out


def describe_keys(cls: type = Config) -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every key: the reference table in the README is generated from this."""
    rows = []
    for f in attrs.fields(cls):
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
        rows.append((f.name, default, f.metadata.get("doc", "")))
    return rows
