"""offload_residual: what each layer keeps for backward goes to host memory after the layer's forward and comes back
two layers ahead in backward, so activation memory stops growing with depth.

With recompute_block a layer keeps only its input residual h (and its LoRA dropout masks when dropout is on); those
tensors are what a layer hands to save() and gets back from load(). Numerics: copies only, so the loss and every
gradient are bit for bit those without offloading.

CUDA (one side stream, events recorded on the compute stream = the current stream of the caller):
  forward of layer l   compute records ready[l]; the side stream waits for it, copies l's tensors into pinned host
                       buffers and records stored[l]. At the end of layer l + 1 the compute stream waits for stored[l]
                       and drops layer l's device tensors: their memory is reused only after the copy has read them
                       (no record_stream, which would keep the blocks of a CUDA graph capture alive to its end).
  backward of layer l  the last layer's tensors are still on the device (never dropped): used as they are. Any other
                       layer was prefetched into slot l % 3 of a device staging ring; compute waits for loaded[l]. Then
                       layers l - 1 and l - 2 are prefetched (compute records free[j], the side stream waits for it, so
                       it overwrites slot j % 3 only after the backward of layer j + 3, its last reader, was queued).
Every side-stream copy is joined back into the compute stream by an event wait, so the whole pattern is captured by
torch.cuda.graph as one graph with two branches. Buffers (pinned host buffers per layer and tensor, the 3-slot ring
per tensor) are allocated when a forward first needs them, which must happen outside a capture (TrainStep's warm-up
does), and are reused on every step and by every captured graph; a larger shape later allocates larger ones and keeps
the outgrown ones alive (a graph captured at the smaller shape still copies into them).
CPU: the same steps with host-to-host copies, no streams or events (the CPU test suite runs this code path).
"""

from __future__ import annotations

import torch

from ._errors import ModelError

RING = 3  # device staging slots: the layer in backward and the two prefetched after it


def check_recompute(recompute) -> None:
    """offload_residual needs recompute_block (a parsed _recompute.Recompute)."""
    if not recompute.block:
        raise ModelError("offload_residual needs recompute_block: without it every layer keeps its full activations "
                         "on the GPU and moving the residual alone saves little. Pass recompute='block' (CLI: "
                         "recompute_block: true), or turn offload_residual off.")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class OffloadBuffers:
    """One per model. begin() at the start of each forward that will be backpropagated; save() in a layer's forward
    (layers in order) returns a ticket; load(ticket) in that layer's backward (layers in reverse order)."""

    def __init__(self):
        self._reset(None)

    def _reset(self, device: torch.device | None) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self.host: list[dict[str, torch.Tensor]] = []  # per layer: key -> uint8 buffer (pinned on CUDA)
        self.ring: list[dict[str, torch.Tensor]] = [{} for _ in range(RING)]  # per slot: key -> uint8 device buffer
        self.events: list[dict[str, torch.cuda.Event]] = []  # per layer: ready, stored, free, loaded
        self.pass_id = 0
        self.layouts: list[dict] = []  # per layer of this pass: key -> (shape, dtype), or None for a None value
        self.pending: dict[int, dict] = {}  # layer -> its device tensors, not yet released
        self.fetched: set[int] = set()  # layers whose host -> device copy was issued in this pass
        self.retired: list[torch.Tensor] = []  # outgrown buffers: a graph captured earlier may still copy into them
        self.leftover: list[dict] = []  # pending tensors of a pass never backpropagated, met inside a capture

    # ------------------------------------------------------------------------------------------ public steps
    def begin(self, device: torch.device) -> OffloadBuffers:
        """A new forward pass: release the previous pass's device tensors (a pass never backpropagated)."""
        if device != self.device:
            if _capturing(device):
                raise ModelError("offload_residual: the first forward on a device ran inside a CUDA graph capture; "
                                 "run one step eagerly first (it allocates the host buffers), then capture.")
            self._reset(device)
        if self.pending or self.leftover:
            if _capturing(device):  # their copies were queued before the capture: no event of it can join them
                self.leftover.extend(self.pending.values())  # so they stay alive until an eager pass
            else:
                if self.stream is not None:
                    torch.cuda.current_stream(device).wait_stream(self.stream)
                self.leftover = []
            self.pending = {}
        self.pass_id += 1
        self.layouts = []
        self.fetched = set()
        return self

    def save(self, tensors: dict) -> tuple[int, int]:
        """Copy a layer's kept tensors (name -> tensor or None) to its host buffers; -> ticket for load()."""
        layer = len(self.layouts)
        layout = {k: None if t is None else (t.shape, t.dtype) for k, t in tensors.items()}
        self.layouts.append(layout)
        host = self._views(self._host_buffers(layer), layout, on_host=True)
        self._views(self.ring[layer % RING], layout, on_host=False)  # sized here: backward never allocates
        if self.stream is None:
            for k, t in tensors.items():
                if t is not None:
                    host[k].copy_(t)
        else:
            compute = torch.cuda.current_stream(self.device)
            ev = self._events(layer)
            ev["ready"].record(compute)
            self.stream.wait_event(ev["ready"])
            with torch.cuda.stream(self.stream):
                for k, t in tensors.items():
                    if t is not None:
                        host[k].copy_(t, non_blocking=True)
            ev["stored"].record(self.stream)
        self.pending[layer] = dict(tensors)
        self._release(lambda j: j < layer)
        return self.pass_id, layer

    def load(self, ticket: tuple[int, int]) -> dict:
        """A layer's kept tensors on the device (in backward); prefetches the two layers before it."""
        pass_id, layer = ticket
        if pass_id != self.pass_id:
            raise ModelError("offload_residual: a second forward pass ran before this backward and reused the host "
                             "buffers; run backward after each forward (sum losses inside one forward instead), or "
                             "turn offload_residual off.")
        compute = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if layer in self.pending:  # never left the device (the last layer): still intact
            tensors = self.pending.pop(layer)
            if compute is not None:
                compute.wait_event(self._events(layer)["stored"])
        else:
            if layer not in self.fetched:
                self._prefetch(layer, compute)
            tensors = self._views(self.ring[layer % RING], self.layouts[layer], on_host=False)
        for j in (layer - 1, layer - 2):
            if j >= 0 and j not in self.pending and j not in self.fetched:
                self._prefetch(j, compute)
        if compute is not None and layer in self.fetched:
            compute.wait_event(self._events(layer)["loaded"])
        return tensors

    def nbytes(self) -> tuple[int, int]:
        """(host bytes, device staging bytes) allocated."""
        host = sum(b.numel() for layer in self.host for b in layer.values())
        return host, sum(b.numel() for slot in self.ring for b in slot.values())

    # ------------------------------------------------------------------------------------------ internals
    def _prefetch(self, layer: int, compute) -> None:
        host = self._views(self.host[layer], self.layouts[layer], on_host=True)
        slot = self._views(self.ring[layer % RING], self.layouts[layer], on_host=False)
        if compute is None:
            for k, t in host.items():
                if t is not None:
                    slot[k].copy_(t)
        else:
            ev = self._events(layer)
            ev["free"].record(compute)
            self.stream.wait_event(ev["free"])
            with torch.cuda.stream(self.stream):
                for k, t in host.items():
                    if t is not None:
                        slot[k].copy_(t, non_blocking=True)
            ev["loaded"].record(self.stream)
        self.fetched.add(layer)

    def _release(self, which) -> None:
        """Drop the pending device tensors of the layers `which` picks, once their copies to the host are done."""
        for layer in [j for j in self.pending if which(j)]:
            if self.stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self._events(layer)["stored"])
            del self.pending[layer]

    def _host_buffers(self, layer: int) -> dict[str, torch.Tensor]:
        while len(self.host) <= layer:
            self.host.append({})
        return self.host[layer]

    def _events(self, layer: int) -> dict:
        while len(self.events) <= layer:
            self.events.append({k: torch.cuda.Event() for k in ("ready", "stored", "free", "loaded")})
        return self.events[layer]

    def _views(self, store: dict, layout: dict, on_host: bool) -> dict:
        """key -> a view of store[key] with the layout's shape and dtype (grown or allocated outside a capture)."""
        out = {}
        for k, spec in layout.items():
            if spec is None:
                out[k] = None
                continue
            shape, dtype = spec
            n = shape.numel() * dtype.itemsize
            buf = store.get(k)
            if buf is None or buf.numel() < n:
                if _capturing(self.device):
                    raise ModelError("offload_residual: the activation shapes changed inside a CUDA graph capture; "
                                     "run the new shape eagerly once first (it allocates the buffers), then capture.")
                if buf is not None:
                    self.retired.append(buf)
                buf = store[k] = torch.empty(n, dtype=torch.uint8, device="cpu" if on_host else self.device,
                                             pin_memory=on_host and self.stream is not None)
            out[k] = buf[:n].view(dtype).view(shape)
        return out
