"""What every block of one forward call shares: dims, document layout, RoPE table, recompute flags, LoRA,
the residual offload buffers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._offload import OffloadBuffers
from .._recompute import Recompute
from ..config import ModelConfig
from . import _cudnn, _flash, _reference_attention
from ._documents import Documents


@dataclass
class BlockContext:
    config: ModelConfig
    docs: Documents
    inv_freq: torch.Tensor  # fp32 [head_dim // 2]
    recompute: Recompute
    flash: bool  # FlashAttention varlen (CUDA bf16/fp16) or the reference attention
    lora_scale: float = 1.0
    dropout: float = 0.0  # LoRA dropout in effect (0 outside training)
    offload: OffloadBuffers | None = None  # offload_residual: where RecomputedBlock keeps its saved tensors

    @property
    def attention(self):
        """cuDNN for rows that are one document each (when it runs these shapes), FlashAttention-2 varlen for
        packed rows, the reference attention on CPU / fp32."""
        if not self.flash:
            return _reference_attention
        c, q = self.config, self.inv_freq
        if self.docs.rows_are_documents and _cudnn.available(q.device.index or 0, c.num_heads, c.num_kv_heads,
                                                             c.head_dim):
            return _cudnn
        return _flash

    @property
    def softmax_scale(self) -> float:
        return self.config.head_dim**-0.5
