"""load_pretrained: a Hugging Face model folder -> CausalLM (full fine-tune, or LoRA with frozen base weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from ._errors import ModelError
from .config import ModelConfig
from .lora import LoraConfig
from .model import CausalLM
from .weights import fused_names, hf_shapes, load_hf

_DTYPES = (torch.bfloat16, torch.float32)  # what the kernels compute in (fp16 checkpoints are converted on load)


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    lora: LoraConfig | None = None, recompute: str | dict | None = None) -> CausalLM:
    """Read config.json and model.safetensors (or a sharded index) from `path`.

    dtype: the weights' dtype after loading: bf16 or fp32, converted from the files' bf16 / fp16 / fp32.
    lora: None for full fine-tuning (every parameter trainable), or a LoraConfig (base weights frozen).
    recompute: None, "block", "att,ffn", or {"recompute_block": True, ...} (see _recompute.py).
    """
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: not a folder. Point to a Hugging Face model folder (config.json + safetensors).")
    config = ModelConfig.from_hf(path)
    tensors, layout = load_hf(path, config, dtype, torch.device(device))
    return CausalLM(config, tensors, lora=lora, recompute=recompute, layout=layout)


def init_model(config: ModelConfig | dict, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               lora: LoraConfig | None = None, recompute: str | dict | None = None, seed: int = 0,
               std: float = 0.02) -> CausalLM:
    """A model with fresh weights (pre-training from scratch, benchmarks): matrices ~ N(0, std), norms 1, biases 0.
    `config` is a ModelConfig or a Hugging Face config.json dict. Drawn on `device` with a seeded generator."""
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
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
            tensors[name] = (torch.randn(shape, generator=generator, device=device) * std).to(dtype)
    return CausalLM(config, tensors, lora=lora, recompute=recompute)
