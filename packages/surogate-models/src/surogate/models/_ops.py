"""The surogate.kernels ops the blocks call: CUDA tensors run the Numba kernels, CPU tensors the torch references
(the same numerics, fp32 compute for bf16/fp32 inputs)."""

from surogate.kernels import (
    bias_grad,
    cross_entropy_loss,
    embedding_backward,
    embedding_forward,
    fused_add_rms_norm_backward,
    fused_add_rms_norm_forward,
    fused_linear_cross_entropy,
    qk_norm_rope_backward,
    qk_norm_rope_forward,
    rms_norm_backward,
    rms_norm_forward,
    rope_backward,
    rope_forward,
    rope_inv_freq,
    swiglu_backward,
    swiglu_forward,
)

__all__ = [
    "bias_grad",
    "cross_entropy_loss",
    "embedding_backward",
    "embedding_forward",
    "fused_add_rms_norm_backward",
    "fused_add_rms_norm_forward",
    "fused_linear_cross_entropy",
    "qk_norm_rope_backward",
    "qk_norm_rope_forward",
    "rms_norm_backward",
    "rms_norm_forward",
    "rope_backward",
    "rope_forward",
    "rope_inv_freq",
    "swiglu_backward",
    "swiglu_forward",
]
