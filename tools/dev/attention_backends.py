"""Which attention kernel to use on the H100: FlashAttention-2 varlen (what the blocks call) vs cuDNN attention
(varlen via cum_seq, and dense [b, h, s, d] causal), forward and backward, checked against FA2's results.
Usage: python tools/dev/attention_backends.py  (CUDA only; prints ms and relative errors)."""
# ruff: noqa: B023, E501  (a measuring probe: closures timed inside their own loop iteration)

import torch

A = torch.ops.aten


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def timed(fn, n=20):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def run(b, s, hq, hkv, d, docs_per_row=1):
    torch.manual_seed(0)
    t = b * s
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
    doc = s // docs_per_row
    cu = torch.arange(0, t + 1, doc, device="cuda", dtype=torch.int32)
    scale = d ** -0.5
    flops = 4 * (t // doc) * doc * doc / 2 * hq * d
    print(f"\n# b={b} s={s} hq={hq} hkv={hkv} d={d} docs/row={docs_per_row}")

    def fa_f():
        return A._flash_attention_forward(q, k, v, cu, cu, doc, doc, 0.0, True, False, scale=scale)
    out, lse, rng, un, _ = fa_f()

    def fa_b():
        return A._flash_attention_backward(do, q, k, v, out, lse, cu, cu, doc, doc, 0.0, True, rng, un, scale=scale)
    dq, dk, dv = fa_b()
    tf, tb = timed(fa_f), timed(fa_b)
    print(f"flash2 varlen   fwd {tf:.3f} ms ({flops / tf / 1e9:.0f} TF/s)  bwd {tb:.3f} ms ({2.5 * flops / tb / 1e9:.0f} TF/s)")

    cu64 = cu.to(torch.int64)
    for name, kk, vv in (("cudnn varlen gqa", k, v),
                         ("cudnn varlen exp", k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))):
        for cs in (cu, cu64):
            try:
                def cf():
                    return A._cudnn_attention_forward(q, kk, vv, None, cs, cs, doc, doc, True, 0.0, True, False,
                                                      scale=scale)
                r = cf()
                o2, l2 = r[0], r[1]

                def cb():
                    return A._cudnn_attention_backward(do, q, kk, vv, o2, l2, r[6], r[7], torch.empty(0, device="cuda"),
                                                       cs, cs, doc, doc, 0.0, True, scale=scale)
                g = cb()
                tf2, tb2 = timed(cf), timed(cb)
                dk2 = g[1].view(t, hkv, -1, d).sum(2) if g[1].shape[1] != hkv else g[1]
                dv2 = g[2].view(t, hkv, -1, d).sum(2) if g[2].shape[1] != hkv else g[2]
                print(f"{name} {cs.dtype} fwd {tf2:.3f} ms ({flops / tf2 / 1e9:.0f})  bwd {tb2:.3f} ms "
                      f"({2.5 * flops / tb2 / 1e9:.0f})  out {rel(o2, out):.1e} lse {lse.shape}/{l2.shape} "
                      f"dq {rel(g[0], dq):.1e} dk {rel(dk2, dk):.1e} dv {rel(dv2, dv):.1e}")
            except Exception as e:  # noqa: BLE001
                print(f"{name} {cs.dtype}: {type(e).__name__}: {str(e)[:300]}")
    if docs_per_row == 1:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, gqa in (("sdpa cudnn gqa", True), ("sdpa cudnn exp", False), ("sdpa flash exp", False)):
            backend = SDPBackend.FLASH_ATTENTION if "flash" in name else SDPBackend.CUDNN_ATTENTION
            try:
                kk = k if gqa else k.repeat_interleave(hq // hkv, 1)
                vv = v if gqa else v.repeat_interleave(hq // hkv, 1)
                qd = q.view(b, s, hq, d).transpose(1, 2).detach().requires_grad_()
                kd = kk.view(b, s, -1, d).transpose(1, 2).detach().requires_grad_()
                vd = vv.view(b, s, -1, d).transpose(1, 2).detach().requires_grad_()
                dod = do.view(b, s, hq, d).transpose(1, 2)

                def df():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)

                def dfb():
                    o = df()
                    return torch.autograd.grad(o, (qd, kd, vd), dod)
                o2 = df()
                g = dfb()
                tf2, tfb = timed(df), timed(dfb)
                tb2 = tfb - tf2
                dk2 = g[1].transpose(1, 2).reshape(t, -1, d)
                dk2 = dk2.view(t, hkv, -1, d).sum(2) if dk2.shape[1] != hkv else dk2
                print(f"{name} fwd {tf2:.3f} ms ({flops / tf2 / 1e9:.0f})  bwd {tb2:.3f} ms "
                      f"({2.5 * flops / tb2 / 1e9:.0f})  out {rel(o2.transpose(1, 2).reshape(t, hq, d), out):.1e} "
                      f"dq {rel(g[0].transpose(1, 2).reshape(t, hq, d), dq):.1e} dk {rel(dk2, dk):.1e}")
            except Exception as e:  # noqa: BLE001
                print(f"{name}: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    print(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name())
    run(2, 2048, 16, 8, 128)
    run(2, 2048, 32, 8, 128)
    run(2, 2048, 16, 8, 128, docs_per_row=4)
    run(2, 2048, 32, 8, 64)
