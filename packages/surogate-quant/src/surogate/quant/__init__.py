"""surogate.quant: FP8 / NVFP4 / NF4 formats, training recipes and 8-bit AdamW.

Each format has a Numba kernel for CUDA tensors and a torch reference for CPU tensors (bit-identical where the
format allows). Modules: fp8, nvfp4, nf4, dynamic8 (bitsandbytes' 8-bit dynamic map), fp8_block (128x128-tile FP8
weights), qlora (QuantizedWeight), recipe (bf16 / fp8-hybrid / nvfp4 GEMM paths), optim (8-bit AdamW).
"""

from surogate.kernels import _runtime as _runtime  # noqa: I001  (numba's import shims before numba loads)

from . import fp8
from .__about__ import __version__

__all__ = ["__version__", "fp8"]
