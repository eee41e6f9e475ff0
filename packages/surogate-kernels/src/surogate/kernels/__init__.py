"""surogate.kernels: Numba-CUDA training kernels with torch references.

Each op has a public function that runs the Numba kernel on CUDA tensors and the torch reference on CPU
tensors; `surogate.kernels.torch` wraps them as autograd Functions and nn.Modules.
"""

from .__about__ import __version__
from ._runtime import SIMULATOR, Kernel
from .ops.abs_max import abs_max
from .ops.adamw import adamw_step, clip_scale, global_grad_norm
from .ops.bias_grad import bias_grad
from .ops.cross_entropy import cross_entropy_forward_backward, cross_entropy_loss
from .ops.embedding import embedding_backward, embedding_forward
from .ops.fused_add_rms_norm import fused_add_rms_norm_backward, fused_add_rms_norm_forward
from .ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from .ops.qk_norm_rope import qk_norm_rope_backward, qk_norm_rope_forward
from .ops.rms_norm import rms_norm_backward, rms_norm_forward
from .ops.rope import rope_backward, rope_forward, rope_inv_freq
from .ops.swiglu import swiglu_backward, swiglu_forward

__all__ = [
    "SIMULATOR",
    "Kernel",
    "__version__",
    "abs_max",
    "adamw_step",
    "bias_grad",
    "clip_scale",
    "cross_entropy_forward_backward",
    "cross_entropy_loss",
    "embedding_backward",
    "embedding_forward",
    "fused_add_rms_norm_backward",
    "fused_add_rms_norm_forward",
    "fused_linear_cross_entropy",
    "global_grad_norm",
    "rms_norm_backward",
    "rms_norm_forward",
    "qk_norm_rope_backward",
    "qk_norm_rope_forward",
    "rope_backward",
    "rope_forward",
    "rope_inv_freq",
    "swiglu_backward",
    "swiglu_forward",
]
