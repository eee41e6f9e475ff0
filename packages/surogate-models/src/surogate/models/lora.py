"""LoRA: configuration, peft-compatible initialisation, and the adapter files peft reads.

An adapted projection computes y = x W^T + scale * dropout(x) A^T B^T with A [r, in], B [out, r] and
scale = alpha / r (alpha / sqrt(r) with rsLoRA). Init as peft's default: A Kaiming-uniform (a = sqrt(5), i.e.
bound 1 / sqrt(in)), B zeros, so a fresh adapter leaves the model's outputs unchanged. The base weights are
frozen (requires_grad False: no gradient GEMM, no gradient buffer); the adapter gradients are computed inside
the blocks' hand-written backward. Adapters are saved as peft does: adapter_config.json (peft_type LORA,
task_type CAUSAL_LM, ...) and adapter_model.safetensors with names like
base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ._errors import ModelError
from .config import ModelConfig

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = TARGET_MODULES
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ModelError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ModelError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = TARGET_MODULES if targets in ("all-linear", "all") else (targets,)
        targets = tuple(dict.fromkeys(targets))
        unknown = [t for t in targets if t not in TARGET_MODULES]
        if unknown or not targets:
            raise ModelError(
                f"lora target_modules {list(unknown) or []} not supported; choose from {', '.join(TARGET_MODULES)} "
                "or 'all-linear'."
            )
        object.__setattr__(self, "target_modules", tuple(t for t in TARGET_MODULES if t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def module_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a target module."""
    c = config
    return {
        "q_proj": (c.hidden_size, c.q_size),
        "k_proj": (c.hidden_size, c.kv_size),
        "v_proj": (c.hidden_size, c.kv_size),
        "o_proj": (c.q_size, c.hidden_size),
        "gate_proj": (c.hidden_size, c.intermediate_size),
        "up_proj": (c.hidden_size, c.intermediate_size),
        "down_proj": (c.intermediate_size, c.hidden_size),
    }[module]


def parent(module: str) -> str:
    return "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def init_adapter(config: ModelConfig, module: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) in fp32 on the CPU, drawn from torch's default generator (as peft)."""
    fan_in, fan_out = module_shape(config, module)
    a = torch.empty(rank, fan_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, torch.zeros(fan_out, rank)


def adapter_config_dict(lora: LoraConfig, base_model: str | None) -> dict:
    return {
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": lora.rank,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "target_modules": list(lora.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": lora.use_rslora,
    }


def save_adapter(path: str | Path, lora: LoraConfig, tensors: dict[str, torch.Tensor], base_model: str | None):
    """tensors: our parameter names (model.layers.0.self_attn.q_proj.lora_A.weight ...) -> tensor."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = {PEFT_PREFIX + name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    tmp = path / (ADAPTER_WEIGHTS + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / ADAPTER_WEIGHTS)
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(lora, base_model), indent=2) + "\n")


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A peft LoRA adapter folder -> (LoraConfig, our parameter names -> tensor)."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise ModelError(f"{f}: missing. A LoRA adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}: not valid JSON ({e}).") from None
    if raw.get("peft_type") != "LORA" or raw.get("use_dora") or raw.get("bias", "none") != "none":
        raise ModelError(f"{cfg_file}: only plain LoRA adapters (peft_type LORA, no DoRA, bias none) are supported.")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise ModelError(f"{cfg_file}: per-module rank_pattern / alpha_pattern are not supported.")
    targets = raw.get("target_modules") or []
    lora = LoraConfig(
        rank=int(raw["r"]),
        alpha=raw["lora_alpha"],
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules="all-linear" if targets == "all-linear" else tuple(targets),
        use_rslora=bool(raw.get("use_rslora", False)),
    )
    tensors = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
                tensors[name.replace(".default.weight", ".weight")] = f.get_tensor(key)
    except Exception as e:
        raise ModelError(f"{weights_file}: cannot read the safetensors file ({e}). Re-save the adapter.") from None
    return lora, tensors
