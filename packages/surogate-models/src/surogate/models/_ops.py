"""The surogate.kernels ops the blocks call (CUDA tensor -> Numba kernel, CPU tensor -> torch reference).

While the kernels package is still growing, an op it does not export yet comes from `_pending_ops`
(TODO: remove the fallback once every op below exists in surogate.kernels). `PENDING` lists those.
"""

from __future__ import annotations

import surogate.kernels as _kernels

from . import _pending_ops

_NAMES = (
    "rms_norm_forward",
    "rms_norm_backward",
    "fused_add_rms_norm_forward",
    "fused_add_rms_norm_backward",
    "rope_inv_freq",
    "rope_forward",
    "rope_backward",
    "qk_norm_rope_forward",
    "qk_norm_rope_backward",
    "swiglu_forward",
    "swiglu_backward",
    "bias_grad",
    "embedding_forward",
    "embedding_backward",
    "fused_linear_cross_entropy",
    "cross_entropy_loss",
)
PENDING = tuple(n for n in _NAMES if not hasattr(_kernels, n))


def _op(name):
    return getattr(_kernels, name) if hasattr(_kernels, name) else getattr(_pending_ops, name)


rms_norm_forward = _op("rms_norm_forward")
rms_norm_backward = _op("rms_norm_backward")
fused_add_rms_norm_forward = _op("fused_add_rms_norm_forward")
fused_add_rms_norm_backward = _op("fused_add_rms_norm_backward")
rope_inv_freq = _op("rope_inv_freq")
rope_forward = _op("rope_forward")
rope_backward = _op("rope_backward")
qk_norm_rope_forward = _op("qk_norm_rope_forward")
qk_norm_rope_backward = _op("qk_norm_rope_backward")
swiglu_forward = _op("swiglu_forward")
swiglu_backward = _op("swiglu_backward")
bias_grad = _op("bias_grad")
embedding_forward = _op("embedding_forward")
embedding_backward = _op("embedding_backward")
fused_linear_cross_entropy = _op("fused_linear_cross_entropy")
cross_entropy_loss = _op("cross_entropy_loss")
