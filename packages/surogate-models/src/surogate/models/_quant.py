"""Recipes and QLoRA for the model: the user's `recipe` / `qlora` arguments checked and resolved, the frozen base
weights quantised as they load, and the memory report.

The model never branches on formats: each base linear layer (qkv, o, gate_up, down) asks the Recipe for its
context (`recipe.linear(name, layer)`), and a layer whose context is quantised or whose base weight is a QLoRA
QuantizedWeight gets a blocks._gemm.Gemm; every other layer runs the plain torch GEMMs. lm_head and the embeddings
are never registered: they stay in the model dtype, as do norms, biases and the LoRA adapters.
QLoRA formats (surogate.quant.QuantizedWeight): "fp8" (E4M3, one fp32 scale per 128x128 tile; option `tile`),
"nvfp4" (E2M1, E4M3 scales per 16 values, fp32 global scale), "nf4" (bitsandbytes NF4; options `block_size` 64,
`double_quant` True). The fused qkv / gate_up matrices are quantised whole (tiles and blocks may span the q / k / v
and gate / up row boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surogate.quant import RECIPES, QuantizedWeight, Recipe

from ._errors import ModelError
from .config import ModelConfig

QLORA_FORMATS = ("fp8", "nvfp4", "nf4")
_QLORA_OPTIONS = {"fp8": ("tile",), "nvfp4": (), "nf4": ("block_size", "double_quant")}
# our parameter names (under model.layers.{i}.) of the base linear weights: what a recipe and QLoRA act on
BASE_LINEARS = {"qkv": "self_attn.qkv_proj.weight", "o": "self_attn.o_proj.weight",
                "gate_up": "mlp.gate_up_proj.weight", "down": "mlp.down_proj.weight"}  # fmt: skip
_NVFP4_BLOCK = 16


def _linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each base linear weight."""
    c = config
    return {"qkv": (c.qkv_size, c.hidden_size), "o": (c.hidden_size, c.q_size),
            "gate_up": (2 * c.intermediate_size, c.hidden_size),
            "down": (c.hidden_size, c.intermediate_size)}  # fmt: skip


def resolve_recipe(recipe: str | Recipe | None, config: ModelConfig) -> Recipe:
    """None / "bf16" / "fp8-hybrid" / "nvfp4" -> a fresh Recipe for config's layers; a Recipe object is checked."""
    if recipe is None:
        recipe = "bf16"
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ModelError(f"recipe must be one of {', '.join(RECIPES)} (or a surogate.quant.Recipe), got "
                             f"{recipe!r}.")
        recipe = Recipe(recipe, n_layers=config.num_layers)
    elif not isinstance(recipe, Recipe):
        raise ModelError(f"recipe must be a name ({', '.join(RECIPES)}) or a surogate.quant.Recipe, got "
                         f"{type(recipe).__name__}.")
    if recipe.n_layers != config.num_layers:
        raise ModelError(f"the Recipe was made for n_layers={recipe.n_layers}, the model has {config.num_layers}: "
                         f"build it as Recipe({recipe.name!r}, n_layers={config.num_layers}, ...).")
    if recipe.contexts:
        raise ModelError("this Recipe already serves another model (its layers are registered): give each model a "
                         "new Recipe.")
    if recipe.name == "nvfp4":
        _check_multiple_of_16(config, "recipe nvfp4", "use recipe fp8-hybrid or bf16", both_dims=True)
    return recipe


def _check_multiple_of_16(config: ModelConfig, what: str, fix: str, both_dims: bool) -> None:
    for slot, (n, k) in _linear_shapes(config).items():
        if k % _NVFP4_BLOCK or (both_dims and n % _NVFP4_BLOCK):
            raise ModelError(f"{what} quantises in blocks of {_NVFP4_BLOCK} values: the {slot} weight [{n}, {k}] has "
                             f"a dimension that is not a multiple of {_NVFP4_BLOCK}; {fix}.")


def check_qlora(qlora: str | None, options: dict | None, lora, config: ModelConfig) -> dict:
    """Validate the QLoRA arguments before any weight is read; -> the options for QuantizedWeight.quantize."""
    if qlora is None:
        if options:
            raise ModelError("qlora_options were given without qlora: pass qlora='fp8', 'nvfp4' or 'nf4'.")
        return {}
    if qlora not in QLORA_FORMATS:
        raise ModelError(f"qlora must be None or one of {', '.join(QLORA_FORMATS)}, got {qlora!r}.")
    if lora is None:
        raise ModelError(f"qlora={qlora!r} stores the frozen base weights quantised and trains LoRA adapters on "
                         "them: pass lora=LoraConfig(...) too (or drop qlora for full fine-tuning).")
    options = dict(options or {})
    unknown = sorted(set(options) - set(_QLORA_OPTIONS[qlora]))
    if unknown:
        allowed = ", ".join(_QLORA_OPTIONS[qlora]) or "none"
        raise ModelError(f"qlora_options {unknown} do not apply to qlora={qlora!r} (allowed: {allowed}).")
    if qlora == "nvfp4":
        _check_multiple_of_16(config, "qlora nvfp4", "use qlora fp8 or nf4", both_dims=False)
    try:  # bad option values fail here, before the weights are read
        QuantizedWeight.quantize(torch.linspace(-1, 1, 32 * 64).view(32, 64), qlora, **options)
    except (TypeError, ValueError) as e:
        raise ModelError(f"qlora={qlora!r} with qlora_options {options}: {e}") from None
    return options


def is_base_linear(name: str) -> bool:
    """Whether our parameter `name` is a base linear weight (qkv, o, gate_up, down) of a layer."""
    return name.startswith("model.layers.") and name.endswith(tuple(BASE_LINEARS.values()))


def quantizer(qlora: str | None, options: dict, dtype: torch.dtype):
    """-> None, or convert(name, tensor) that returns a QuantizedWeight for base linear weights (the bf16 tensor
    is dropped as soon as it is quantised) and the tensor itself for everything else."""
    if qlora is None:
        return None

    def convert(name: str, tensor):
        if isinstance(tensor, QuantizedWeight) or not is_base_linear(name):
            return tensor
        try:
            return QuantizedWeight.quantize(tensor, qlora, dtype=dtype, **options)
        except (TypeError, ValueError) as e:
            raise ModelError(f"qlora={qlora!r} cannot quantise `{name}` {list(tensor.shape)}: {e}") from None

    return convert


# ------------------------------------------------------------------------------------------------ memory report
def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of the model's weights. `quantized`: QLoRA base weights as stored (codes + scales);
    `quantized_dense`: what those would take in the model dtype; `dense`: every other weight, in the model dtype
    (embeddings, norms, biases, lm_head, and the base linear weights without QLoRA); `adapters`: LoRA A and B.
    `description`: one line for the run log, ending with the recipe's describe()."""

    quantized: int
    quantized_dense: int
    dense: int
    adapters: int
    description: str

    @property
    def total(self) -> int:
        return self.quantized + self.dense + self.adapters

    def __str__(self) -> str:
        return self.description


def memory_report(model) -> MemoryReport:
    dtype_name = str(model.dtype).replace("torch.", "")
    element = torch.empty((), dtype=model.dtype).element_size()
    base = [q for layer in model.model.layers for q in layer.base.values()]
    quantized = sum(q.nbytes for q in base)
    quantized_dense = sum(q.shape.numel() * element for q in base)
    adapters = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" not in n)
    streamed, slots = model.host_weights.nbytes() if model.host_weights is not None else (0, 0)
    dense += slots - streamed  # offload_weights: the base weights are placeholders here, 3 layer slots instead
    parts = []
    if base:
        ratio = quantized / max(quantized_dense, 1)
        parts.append(f"QLoRA {model.qlora} base weights {_size(quantized)} ({ratio:.1%} of {_size(quantized_dense)} "
                     f"in {dtype_name}, {8 * quantized / sum(q.shape.numel() for q in base):.3f} bits a weight, "
                     f"dequantised to {dtype_name} for each GEMM)")
        parts.append(f"{dtype_name} weights {_size(dense)} (embeddings, norms, lm_head, biases)")
    else:
        parts.append(f"{dtype_name} weights {_size(dense)}")
    if streamed:
        parts.append(f"frozen base weights {_size(streamed)} in host memory (offload_weights; {_size(slots)} of "
                     "device slots, included above)")
    adapter_text = f"LoRA adapters {_size(adapters)}" if model.lora_config is not None else "no adapters (full)"
    description = (f"weights {_size(quantized + dense + adapters)}: {', '.join(parts)}, {adapter_text}; "
                   f"{model.recipe.describe(model.device)}")
    return MemoryReport(quantized, quantized_dense, dense, adapters, description)
