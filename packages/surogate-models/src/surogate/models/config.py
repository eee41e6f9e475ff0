"""ModelConfig: the architecture read from a Hugging Face config.json.

Supported: LlamaForCausalLM, Qwen2ForCausalLM (bias on q/k/v) and Qwen3ForCausalLM (per-head RMSNorm on q and
k, explicit head_dim). Both config.json styles are read: transformers 4 (`rope_theta` + `rope_scaling`) and
transformers 5 (`rope_parameters`). The raw dict is kept so that save_pretrained writes it back unchanged
(except the dtype).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._errors import ModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # HF semantics, with "rope_type" (llama3 / linear); None for plain RoPE
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q, k and v (Qwen2 always; Llama/Qwen3 when attention_bias)
    o_bias: bool  # bias on o_proj (Llama/Qwen3 when attention_bias)
    qk_norm: bool  # Qwen3
    torch_dtype: str | None  # the checkpoint's dtype as written in config.json
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read `path/config.json` (or `path` itself when it is the json file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelError(
                f"{file}: no config.json. Point to a Hugging Face model folder (config.json + model.safetensors)."
            )
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{file}: not valid JSON ({e}). Re-download or fix the file.") from None
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        arch = _architecture(raw, source)

        def need(key):
            if key not in raw or raw[key] is None:
                raise ModelError(f"{source}: key `{key}` is missing; {arch} configs must set it.")
            return raw[key]

        def fail(key, why):
            raise ModelError(f"{source}: `{key}` {why}")

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            fail("num_key_value_heads", f"= {kv_heads} must divide num_attention_heads = {heads}.")
        if raw.get("hidden_act", "silu") != "silu":
            fail("hidden_act", f"= {raw['hidden_act']!r} is not supported (only silu / SwiGLU).")
        if raw.get("mlp_bias"):
            fail("mlp_bias", "= true is not supported (no bias on gate/up/down).")
        if raw.get("use_sliding_window"):
            fail("use_sliding_window", "= true is not supported (full causal attention only); set it to false.")
        theta, scaling = _rope(raw, source)
        attention_bias = bool(raw.get("attention_bias", False))
        dtype = raw.get("torch_dtype", raw.get("dtype"))
        if dtype is not None and dtype not in _DTYPES:
            fail("torch_dtype", f"= {dtype!r} is not one of {sorted(_DTYPES)}.")
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(need("vocab_size")),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "Qwen2ForCausalLM" else attention_bias,
            o_bias=False if arch == "Qwen2ForCausalLM" else attention_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=dtype,
            raw=dict(raw),
        )

    def to_hf_dict(self, dtype: torch.dtype) -> dict[str, Any]:
        """The source config.json with the dtype of the weights we write."""
        out = dict(self.raw)
        name = {v: k for k, v in _DTYPES.items()}[dtype]
        keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
        for k in keys:
            out[k] = name
        out.setdefault("architectures", [self.architecture])
        return out


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES[name]


def _architecture(raw: dict, source: str) -> str:
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[raw["model_type"]]]
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    found = ", ".join(archs) or f"model_type={raw.get('model_type')!r}"
    raise ModelError(
        f"{source}: architecture {found} is not supported. Supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
    )


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = raw.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        key = "rope_parameters"
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = dict(raw.get("rope_scaling") or {})
        key = "rope_scaling"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"{source}: `{key}` rope_type {rope_type!r} is not supported. "
            f"Supported: {', '.join(_SUPPORTED_ROPE_TYPES)}."
        )
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    needed = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "linear": ("factor",)}[rope_type]
    for k in needed:
        if k not in scaling:
            raise ModelError(f"{source}: `{key}` of rope_type {rope_type!r} needs `{k}`.")
    return float(theta), scaling
