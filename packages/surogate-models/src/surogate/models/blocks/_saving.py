"""Packing a dict of kept activations (tensors, None, or short tuples/lists of tensors) into
ctx.save_for_backward, and back. Tensors that are outputs of the Function (h) must go through
save_for_backward, not ctx attributes, or they form a reference cycle with their grad_fn."""

from __future__ import annotations


def pack(ctx, saved: dict, tensors) -> None:
    ctx.keys, ctx.lists = [], {}
    flat = []
    for k, v in saved.items():
        if isinstance(v, (list, tuple)):  # LoRA u lists, FlashAttention's (rng_state, unused)
            ctx.lists[k] = (type(v), len(v))
            flat.extend(v)
        else:
            flat.append(v)
        ctx.keys.append(k)
    ctx.save_for_backward(*flat, *tensors)


def unpack(ctx, slots) -> tuple[dict, dict]:
    """-> (acts, weights by slot name)."""
    saved = list(ctx.saved_tensors)
    acts = {}
    i = 0
    for k in ctx.keys:
        if k in ctx.lists:
            kind, n = ctx.lists[k]
            acts[k] = kind(saved[i : i + n])
            i += n
        else:
            acts[k] = saved[i]
            i += 1
    return acts, dict(zip(slots, saved[i:], strict=True))
