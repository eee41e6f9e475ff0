"""offload_weights (LoRA): the frozen base weights of each layer (qkv, o, gate_up, down) live in (pinned) host memory
and are copied, a layer at a time, into a ring of 2 layer-sized device slots just ahead of use: in forward layer
l + 1 while layer l computes, in backward layer l - 1 while layer l computes. A weight that a Function saves for
backward is replaced by a token (saved-tensor hooks, `hooks()`) and fetched again in backward. Copies only: the
numbers are those of the same weights kept on the device.

CUDA (one side stream; events on the compute stream, the caller's current stream):
  fetch of layer l into slot s = l % 2: compute records free[s] (every reader of the slot's previous layer, l - 2
  in forward and l + 2 in backward, has been queued by then), the side stream waits for it (the copy starts once
  that layer's compute is done, overlapping layer l - 1's or l + 1's), copies, records loaded[l]; compute waits for
  loaded[l] before it reads layer l. Every copy is joined back by such a wait, so the pattern is captured by
  torch.cuda.graph.
  Each forward pass starts from an empty ring (`begin`): a captured graph fetches everything it reads, and eager
  passes in between (evaluation) do not disturb it; within a pass, backward reuses what forward left in the ring.
CPU: the same steps with host-to-host copies (the CPU test suite runs this path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._errors import ModelError

RING = 2  # device slots: the layer computing, the one prefetched (8B, micro-batch 4, H200: 3 slots ran 1.3% faster
#          and peaked 2.2 GiB higher)


class _Token:
    """What a saved streamed weight is replaced by between forward and backward."""

    __slots__ = ("key",)

    def __init__(self, key: tuple):
        self.key = key


class HostWeights:
    """The weights provider of offload_weights: `provider(tensors) -> tensors` with every streamed weight replaced by
    a view of its device slot. layers[l]: the frozen parameters of layer l to stream (same dtype); they become
    placeholders on `device` (one NaN expanded to their shape: no memory)."""

    def __init__(self, layers: Sequence[Sequence[torch.nn.Parameter]], device: torch.device):
        if not layers or any(not params for params in layers):
            raise ModelError("offload_weights: every layer needs frozen base weights to stream")
        dtype = layers[0][0].dtype
        pin = device.type == "cuda"
        self.device = device
        self._where: dict[int, tuple[int, int, torch.Size]] = {}  # id(param) -> (layer, offset, shape)
        self.host: list[torch.Tensor] = []
        for layer, params in enumerate(layers):
            flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, pin_memory=pin)
            offset = 0
            for p in params:
                if p.requires_grad or p.dtype != dtype:
                    raise ModelError(f"offload_weights streams frozen {dtype} weights; layer {layer} has a "
                                     f"{'trainable' if p.requires_grad else str(p.dtype)} one")
                flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
                self._where[id(p)] = (layer, offset, p.shape)
                offset += p.numel()
            self.host.append(flat)
        for params in layers:
            for p in params:
                p.data = torch.full((1,), float("nan"), dtype=dtype, device=device).expand(p.shape)
        size = max(h.numel() for h in self.host)
        self.slots = [torch.empty(size, dtype=dtype, device=device) for _ in range(RING)]
        self.stream = torch.cuda.Stream(device) if pin else None
        self.free = [torch.cuda.Event() for _ in range(RING)] if pin else []
        self.loaded = [torch.cuda.Event() for _ in self.host] if pin else []
        self.resident: list[int | None] = [None] * RING  # the layer each slot holds in this pass
        self._views: dict[tuple, tuple] = {}  # (data_ptr, shape, stride) of a handed-out weight -> its key

    def nbytes(self) -> tuple[int, int]:
        """(host bytes, device slot bytes)."""
        element = self.slots[0].element_size()
        return sum(h.numel() for h in self.host) * element, sum(s.numel() for s in self.slots) * element

    # -- the provider ------------------------------------------------------------------------------------------

    def begin(self) -> None:
        """A new forward pass: nothing is assumed to be in the ring."""
        self.resident = [None] * RING
        self._views.clear()

    def __call__(self, tensors: Sequence[torch.Tensor | None]) -> tuple:
        hits = [i for i, t in enumerate(tensors) if t is not None and id(t) in self._where]
        if not hits:
            return tuple(tensors)
        layer = self._where[id(tensors[hits[0]])][0]
        self._ensure(layer)
        self._fetch(layer + 1)  # overlaps this layer's compute
        result = list(tensors)
        for i in hits:
            key = self._where[id(tensors[i])]
            w = self._view(key)
            self._views[(w.data_ptr(), tuple(w.shape), w.stride())] = key
            result[i] = w
        return tuple(result)

    def hooks(self):
        """Saved-tensor hooks for the forward pass: a streamed weight saved for backward becomes a token."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # -- internals ---------------------------------------------------------------------------------------------

    def _view(self, key: tuple) -> torch.Tensor:
        layer, offset, shape = key
        return self.slots[layer % RING][offset : offset + shape.numel()].view(shape)

    def _fetch(self, layer: int) -> None:
        """Start copying `layer` into its slot (no-op when out of range or already there)."""
        if not 0 <= layer < len(self.host):
            return
        s = layer % RING
        if self.resident[s] == layer:
            return
        src, dst = self.host[layer], self.slots[s][: self.host[layer].numel()]
        if self.stream is None:
            dst.copy_(src)
        else:
            self.free[s].record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(self.free[s])
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
            self.loaded[layer].record(self.stream)
        self.resident[s] = layer

    def _ensure(self, layer: int) -> None:
        """`layer` in its slot, and the compute stream ordered after the copy."""
        self._fetch(layer)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[layer])

    def _pack(self, t: torch.Tensor):
        key = self._views.get((t.data_ptr(), tuple(t.shape), t.stride())) if t.numel() else None
        if key is not None:
            return _Token(key)
        if any(_overlaps(t, s) for s in self.slots):
            raise ModelError("offload_weights: a Function saved a view of a streamed weight other than the one it "
                             "was given; its slot is reused before backward. Save the weight tensor itself.")
        return t.detach()  # not t: a node saving its own output would hold itself (a cycle that outlives backward)

    def _unpack(self, saved):
        if not isinstance(saved, _Token):
            return saved
        layer = saved.key[0]
        self._ensure(layer)
        self._fetch(layer - 1)  # backward goes down the layers
        return self._view(saved.key)


def _overlaps(t: torch.Tensor, slot: torch.Tensor) -> bool:
    start, end = slot.data_ptr(), slot.data_ptr() + slot.numel() * slot.element_size()
    return start <= t.data_ptr() < end
