"""Experiment: cost of padding cu_seqlens with empty sequences (static shapes for CUDA graphs) in torch's
FlashAttention varlen forward+backward. 4096 tokens, 12 documents, Qwen3 heads (16 q / 8 kv, head_dim 128).
Prints ms for the exact cu_seqlens and for padded lengths 16, 64, 256, 4097.

Measured 2026-11-27 on the H100 (torch 2.11): exact 0.317 ms; padded to 16: 0.317; 64: 0.403; 256: 0.795;
4097: 8.771 ms; outputs identical. Hence TrainStep pads cu_seqlens to the next power of two (at most 2x the
documents), never to the token count."""

import sys

import torch

sys.path.insert(0, "tools/bench")
from _timing import graph_ms  # noqa: E402

T, H, KV, D = 4096, 16, 8, 128
q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(T, KV, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(T, KV, D, device="cuda", dtype=torch.bfloat16)
starts = [0, 100, 700, 1000, 1500, 2048, 2300, 2600, 3000, 3500, 3900, 4000]
exact = torch.tensor(starts + [T], device="cuda", dtype=torch.int32)


def fwd_bwd(cu):
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, 2048, 2048, 0.0, True,
        False, scale=D**-0.5)
    torch.ops.aten._flash_attention_backward(out, q, k, v, out, lse, cu, cu, 2048, 2048, 0.0, True, rng, unused,
                                             scale=D**-0.5)
    return out


ref = fwd_bwd(exact)
print(f"exact ({len(starts)} docs): {graph_ms(lambda: fwd_bwd(exact)):.3f} ms")
for n in (16, 64, 256, 4097):
    cu = torch.cat([exact, torch.full((n - len(exact),), T, device="cuda", dtype=torch.int32)])
    out = fwd_bwd(cu)
    same = torch.equal(out, ref)
    print(f"padded to {n}: {graph_ms(lambda: fwd_bwd(cu)):.3f} ms, same output: {same}")
