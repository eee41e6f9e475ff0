"""QLoRA base-weight storage: a frozen linear weight kept as FP8 (128x128 tiles), NVFP4 or NF4, dequantised to BF16
by a fast kernel for each GEMM (the LoRA adapters stay in BF16 / FP32).

Formats (`QuantizedWeight.quantize(w, fmt)`, fmt as in the `qlora_*` config keys):
- "fp8":   E4M3 codes + one fp32 scale per 128x128 tile (fp8_block.py): 8.0 bits + 32/16384 a value.
- "nvfp4": E2M1 codes, E4M3 scales per 16 values along the input dim, fp32 global scale (nvfp4.py): 4.5 bits.
- "nf4":   bitsandbytes NF4, block 64, double-quantised absmax (nf4.py): 4.127 bits.
Embeddings, norms and lm_head are not QuantizedWeights: they stay BF16.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import fp8_block, nf4, nvfp4

FORMATS = ("fp8", "nvfp4", "nf4")


class QuantizedWeight:
    """A frozen [out_features, in_features] weight stored quantised. `dequantize()` gives the BF16 tensor."""

    def __init__(self, fmt: str, data, shape: torch.Size, dtype: torch.dtype = torch.bfloat16):
        if fmt not in FORMATS:
            raise ValueError(f"QLoRA weight format must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.data = data
        self.shape = torch.Size(shape)
        self.dtype = dtype  # what dequantize() returns by default (the compute dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: str, *, dtype: torch.dtype = torch.bfloat16, **options) -> QuantizedWeight:
        """options: fp8 `tile` (128); nf4 `block_size` (64), `double_quant` (True)."""
        if w.dim() != 2:
            raise ValueError(f"QLoRA quantises 2-D linear weights, got shape {tuple(w.shape)}")
        w = w.detach()
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.to(torch.bfloat16)
        if fmt == "fp8":
            data = fp8_block.quantize(w, tile=options.get("tile", 128))
        elif fmt == "nvfp4":
            data = nvfp4.quantize(w)
        elif fmt == "nf4":
            data = nf4.quantize(w, options.get("block_size", 64), options.get("double_quant", True))
        else:
            raise ValueError(f"QLoRA weight format must be one of {FORMATS}, got {fmt!r}")
        return cls(fmt, data, w.shape, dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.fmt == "fp8":
            return fp8_block.dequantize(self.data, dtype)
        if self.fmt == "nvfp4":
            return nvfp4.dequantize(self.data, dtype)
        return nf4.dequantize(self.data, dtype)

    @property
    def device(self) -> torch.device:
        return self.data.codes.device

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, self.data.to(device), self.shape, self.dtype)

    def __repr__(self):
        return f"QuantizedWeight({self.fmt}, shape={tuple(self.shape)}, {self.nbytes / 2**20:.2f} MiB)"


def _bytes(t) -> int:
    return t.nbytes if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def memory_report(weights: Mapping[str, QuantizedWeight | torch.Tensor]) -> str:
    """A few lines for the start of a run: bytes of the quantised and the plain weights, against BF16."""
    quantized = {k: w for k, w in weights.items() if isinstance(w, QuantizedWeight)}
    plain = {k: w for k, w in weights.items() if not isinstance(w, QuantizedWeight)}
    q_bytes = sum(_bytes(w) for w in quantized.values())
    q_bf16 = sum(2 * w.shape.numel() for w in quantized.values())
    p_bytes = sum(_bytes(w) for w in plain.values())
    fmts = sorted({w.fmt for w in quantized.values()})
    lines = [
        f"QLoRA base weights ({', '.join(fmts) or 'none'}): {len(quantized)} tensors, {_size(q_bytes)} "
        f"(bf16: {_size(q_bf16)}; {q_bytes / max(q_bf16, 1):.1%}, {16 * q_bytes / max(q_bf16, 1):.3f} bits a weight)",
        f"not quantised (embeddings, norms, lm_head, ...): {len(plain)} tensors, {_size(p_bytes)}",
        f"all weights: {_size(q_bytes + p_bytes)}",
    ]
    return "\n".join(lines)
