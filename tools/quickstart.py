"""Quickstart: prints the environment and runs the RMSNorm kernel (on the GPU if there is one, else the torch
reference on the CPU). Becomes `surogate sft examples/quickstart/sft.yaml` once the trainer lands."""

import torch

import surogate.kernels as K
from surogate.kernels.torch import RMSNorm

device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"surogate.kernels {K.__version__}, torch {torch.__version__}, device {device}")
norm = RMSNorm(1024, device=device, dtype=torch.bfloat16)
x = torch.randn(8, 1024, device=device, dtype=torch.bfloat16, requires_grad=True)
y = norm(x)
y.float().pow(2).mean().backward()
print(f"RMSNorm: y {tuple(y.shape)} {y.dtype}, |dx| = {x.grad.float().norm():.4f}, |dw| = {norm.weight.grad.float().norm():.4f}")
