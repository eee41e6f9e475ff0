"""Helpers for tests of kernels (ours and users'): relative-norm error, dtype tolerances, fresh inputs."""

from __future__ import annotations

import torch

# Relative-norm error allowed after one rounding to the dtype (and fp32 accumulation):
# fp32 ~ 1e-5 (a few ulps over sums of thousands of terms), bf16 ~ 1e-2 (8 mantissa bits: 2^-8 = 3.9e-3 per value).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN or Inf anywhere gives inf."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "", factor: float = 1.0):
    """Relative-norm check at the dtype's tolerance (times `factor`, which callers justify in a comment)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    tol = TOLERANCE[dtype] * factor
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e} ({dtype})"


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, generator=None) -> torch.Tensor:
    """Fresh random normal values (never zeros), drawn in fp32 then cast."""
    return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)
