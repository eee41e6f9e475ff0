"""autograd Functions and nn.Modules over surogate.kernels ops, for users' own torch models (like Liger's modules).

CUDA tensors run the Numba kernels; CPU tensors run the torch reference, so the same module works everywhere.
"""

from .cross_entropy import CrossEntropyFunction, CrossEntropyLoss
from .embedding import Embedding, EmbeddingFunction
from .fused_add_rms_norm import FusedAddRMSNorm, FusedAddRMSNormFunction
from .fused_linear_cross_entropy import LinearCrossEntropyFunction, LinearCrossEntropyLoss
from .qk_norm_rope import QKNormRoPE, QKNormRoPEFunction
from .rms_norm import RMSNorm, RMSNormFunction
from .rope import RoPEFunction, RotaryEmbedding, apply_rope
from .swiglu import SwiGLU, SwiGLUFunction

__all__ = [
    "CrossEntropyFunction",
    "CrossEntropyLoss",
    "Embedding",
    "EmbeddingFunction",
    "FusedAddRMSNorm",
    "FusedAddRMSNormFunction",
    "LinearCrossEntropyFunction",
    "LinearCrossEntropyLoss",
    "QKNormRoPE",
    "QKNormRoPEFunction",
    "RMSNorm",
    "RMSNormFunction",
    "RoPEFunction",
    "RotaryEmbedding",
    "SwiGLU",
    "SwiGLUFunction",
    "apply_rope",
]
