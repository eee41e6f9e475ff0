"""surogate.quant: FP8 / NVFP4 / NF4 formats, training recipes, QLoRA base weights and 8-bit AdamW.

Each format has Numba kernels for CUDA tensors and a torch reference for CPU tensors (bit-identical, also in the
CUDA simulator). Modules: `fp8` (E4M3/E5M2, per-tensor scales, delayed scaling), `fp8_block` (128x128-tile FP8
weights), `nvfp4` (E2M1 + E4M3 block scales, stochastic rounding, random Hadamard), `nf4` (bitsandbytes NF4),
`dynamic8` (bitsandbytes' 8-bit dynamic map), `qlora` (QuantizedWeight), `recipe` (bf16 / fp8-hybrid / nvfp4
GEMM paths), `optim` (8-bit AdamW).
"""

from surogate.kernels import _runtime as _runtime  # noqa: I001  (numba's import shims before numba loads)

from . import dynamic8, fp8, fp8_block, nf4, nvfp4, optim, qlora, recipe
from .__about__ import __version__
from .fp8 import DelayedScaling
from .fp8_block import Fp8BlockTensor
from .nf4 import NF4Tensor
from .nvfp4 import NVFP4Tensor
from .optim import AdamW8bit, AdamW8bitState, adamw8bit_step
from .qlora import QuantizedWeight, memory_report
from .recipe import RECIPES, LinearContext, Recipe

__all__ = [
    "RECIPES",
    "AdamW8bit",
    "AdamW8bitState",
    "DelayedScaling",
    "Fp8BlockTensor",
    "LinearContext",
    "NF4Tensor",
    "NVFP4Tensor",
    "QuantizedWeight",
    "Recipe",
    "__version__",
    "adamw8bit_step",
    "dynamic8",
    "fp8",
    "fp8_block",
    "memory_report",
    "nf4",
    "nvfp4",
    "optim",
    "qlora",
    "recipe",
]
