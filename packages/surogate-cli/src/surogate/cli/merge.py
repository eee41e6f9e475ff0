"""`surogate merge ADAPTER OUTPUT [--base MODEL]`: merge a LoRA adapter into its base model and write a Hugging Face
folder (config.json, safetensors sharded like the base, tokenizer files). The base defaults to the adapter's
base_model_name_or_path. W += scale * B A is computed in fp32 and rounded once to the base's dtype (bf16 or fp32;
fp16 bases are merged and written in fp32). OUTPUT must not exist yet (or be empty): nothing is overwritten. The
folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import UserError


def _base_of(adapter: Path) -> str:
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError("adapter_config.json not found", file=str(adapter),
                        fix="point at a folder written by `surogate sft` with lora: true (output_dir/adapter)")
    try:
        base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise UserError(f"is not valid JSON ({e})", file=str(cfg_path), fix="restore the adapter files") from None
    if not base:
        raise UserError("names no base model (base_model_name_or_path)", file=str(cfg_path),
                        fix="give the base model folder with --base")
    return base


def run(args) -> int:
    adapter, output = Path(args.adapter), Path(args.output)
    base = Path(args.base or _base_of(adapter))
    if not base.is_dir():
        raise UserError("base model folder not found", file=str(base),
                        fix="give the base model folder with --base (a Hugging Face folder with config.json)")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError("exists and is not empty; merge never overwrites", file=str(output),
                        fix="choose a new output folder, or delete this one")

    import torch

    from surogate.models import ModelConfig, load_pretrained

    from .data.tokenizer import TOKENIZER_FILES

    dtype = torch.bfloat16 if ModelConfig.from_hf(base).torch_dtype == "bfloat16" else torch.float32
    model = load_pretrained(base, dtype=dtype, device="cpu")
    model.load_adapter(adapter)
    model.merge_lora()

    parent = output.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{output.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"cannot write the merged model ({e.strerror or e})", file=str(output),
                        fix="choose a folder you can write to") from None
    for name in TOKENIZER_FILES:  # the adapter's copy (what it was trained with), else the base's
        src = adapter / name if (adapter / name).is_file() else base / name
        if src.is_file() and not (tmp / name).exists():
            shutil.copyfile(src, tmp / name)
    if output.exists():
        output.rmdir()  # empty (checked above)
    os.replace(tmp, output)
    print(f"merged {adapter} into {base} -> {output}")
    return 0
