"""load_pretrained / init_model: a Hugging Face model folder or a config -> CausalLM (full fine-tune, LoRA, or
QLoRA with quantised frozen base weights), with the GEMM recipe chosen by name."""

from __future__ import annotations

from pathlib import Path

import torch

from surogate.quant import Recipe

from . import _quant
from ._errors import ModelError
from ._offload import check_recompute
from ._recompute import Recompute
from .config import ModelConfig
from .lora import LoraConfig
from .model import CausalLM
from .weights import fused_names, hf_shapes, load_hf

_DTYPES = (torch.bfloat16, torch.float32)  # what the kernels compute in (fp16 checkpoints are converted on load)


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    lora: LoraConfig | None = None, recompute: str | dict | None = None,
                    recipe: str | Recipe | None = None, qlora: str | None = None,
                    qlora_options: dict | None = None, offload_residual: bool = False,
                    offload_weights: bool = False) -> CausalLM:
    """Read config.json and model.safetensors (or a sharded index) from `path`.

    dtype: the weights' dtype after loading: bf16 or fp32, converted from the files' bf16 / fp16 / fp32.
    lora: None for full fine-tuning (every parameter trainable), or a LoraConfig (base weights frozen).
    recompute: None, "block", "att,ffn", or {"recompute_block": True, ...} (see _recompute.py).
    recipe: "bf16" (default, None alike), "fp8-hybrid", "nvfp4", or a surogate.quant.Recipe built with
        n_layers=config.num_layers (for skip_quant_first_layers / skip_quant_last_layers, amax history, margin).
    qlora: None, "fp8", "nvfp4" or "nf4": store the frozen base weights (qkv, o, gate_up, down) quantised, each
        quantised as it is read; needs lora. qlora_options: {"tile": 128} (fp8), {"block_size": 64,
        "double_quant": True} (nf4).
    offload_residual: keep each layer's input residual in host memory between forward and backward (needs
        recompute="block"; CausalLM.set_offload_residual).
    offload_weights: (LoRA) the frozen base weights stay in host memory and stream to `device` a layer ahead of use
        (CausalLM.set_offload_weights); the model is built on the CPU and only the rest moves to `device`.
    """
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    if offload_residual:  # before the weights are read
        check_recompute(Recompute.parse(recompute))
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: not a folder. Point to a Hugging Face model folder (config.json + safetensors).")
    config = ModelConfig.from_hf(path)
    recipe = _quant.resolve_recipe(recipe, config)  # bad arguments fail before the weights are read
    options = _quant.check_qlora(qlora, qlora_options, lora, config)
    convert = _quant.quantizer(qlora, options, dtype)
    device = torch.device(device)
    tensors, layout = load_hf(path, config, dtype, torch.device("cpu") if offload_weights else device, convert)
    model = CausalLM(config, tensors, lora=lora, recompute=recompute, layout=layout, recipe=recipe, qlora=qlora,
                     qlora_options=options, offload_residual=offload_residual)
    if offload_weights:
        del tensors
        model.set_offload_weights(device)
        model.to(device)
    return model


def init_model(config: ModelConfig | dict, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               lora: LoraConfig | None = None, recompute: str | dict | None = None, seed: int = 0,
               std: float = 0.02, recipe: str | Recipe | None = None, qlora: str | None = None,
               qlora_options: dict | None = None, offload_residual: bool = False,
               offload_weights: bool = False) -> CausalLM:
    """A model with fresh weights (pre-training from scratch, benchmarks): matrices ~ N(0, std), norms 1, biases 0.
    `config` is a ModelConfig or a Hugging Face config.json dict. Drawn on `device` with a seeded generator.
    recipe, qlora, qlora_options, offload_residual, offload_weights: as in load_pretrained (QLoRA quantises each
    weight as it is drawn; offload_weights moves the drawn base weights to host memory afterwards)."""
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    if offload_residual:
        check_recompute(Recompute.parse(recompute))
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    recipe = _quant.resolve_recipe(recipe, config)
    options = _quant.check_qlora(qlora, qlora_options, lora, config)
    convert = _quant.quantizer(qlora, options, dtype)
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, parts in fused_names(config).items():
        shapes = hf_shapes(config)
        rows = sum(shapes[p][0] for p in parts)
        shape = (rows, *shapes[parts[0]][1:])
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            t = torch.randn(shape, generator=generator, device=device).mul_(std).to(dtype)  # in place: one fp32 copy
            tensors[name] = t if convert is None else convert(name, t)
            del t  # with QLoRA: one full-precision weight at a time
    model = CausalLM(config, tensors, lora=lora, recompute=recompute, recipe=recipe, qlora=qlora,
                     qlora_options=options, offload_residual=offload_residual)
    if offload_weights:
        del tensors
        model.set_offload_weights()
    return model
