"""Optimizer buffers in host memory (offload_optimizer, offload_master) and the two ways an update reaches them.

An optimizer update reads and writes per-parameter buffers: the fp32 master weights and the AdamW states (fp32
exp_avg / exp_avg_sq, or 8-bit codes with one fp32 absmax per 2048 parameters). Each buffer is resident (on the
training device) or offloaded to pinned, mapped host memory. An update that touches offloaded buffers runs one of:

- zero_copy: the kernel reads and writes the host memory directly over PCIe, through a CUDA tensor that aliases the
  mapped pinned allocation (unified addressing: numba's mapped_array gives its device pointer, torch wraps it from a
  hand-made __cuda_array_interface__). One launch per group, no staging memory on the GPU.
- stream: the parameters are cut into chunks (a multiple of 2048, so an 8-bit block never straddles two chunks).
  Chunk i's offloaded buffers are copied host -> device into staging slot i % 2 on an upload stream, the update
  runs on the compute stream, and the results go back device -> host on a download stream; events order the three,
  so the upload of chunk i + 1 and the download of chunk i - 1 overlap the update of chunk i. Staging: 2 slots of
  one chunk of every offloaded buffer.

Both are CUDA-graph capturable: the copies are cudaMemcpyAsync between pinned host memory and the device on side
streams that fork from the capturing stream and are joined back into it; the zero-copy aliases are plain device
pointers. Host memory is allocated at its exact size (torch's pinned caching allocator would round to a power of 2).
Numerics: the updates are elementwise (8-bit: per 2048-block), so chunked and zero-copy updates give the resident
update's values bit for bit. Host buffers are written asynchronously: synchronize before the host reads them.
On a CPU (tests, CI) the same code runs host to host: the "device" tensors are CPU tensors, the host buffers
separate CPU tensors; zero_copy updates them in place, stream copies each chunk through CPU staging tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CHUNK = 32 * 2**20  # parameters per streamed chunk (a multiple of 2048): 768 MiB of staging for fp32 master + AdamW
BLOCK = 2048  # 8-bit AdamW block: chunk boundaries must be multiples of it


class _Interface:
    """A bare object exposing a __cuda_array_interface__ dict, for torch.as_tensor (zero copy)."""

    def __init__(self, interface: dict):
        self.__cuda_array_interface__ = interface


def host_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, object]:
    """-> (host tensor, device alias, owner) of `numel` zeroed values. CUDA: pinned host memory mapped into the device
    address space (cuMemHostAlloc with DEVICEMAP, through numba), the alias a CUDA tensor at its device pointer; keep
    `owner` alive as long as either tensor. CPU: a plain tensor, its own alias."""
    if device.type != "cuda":
        t = torch.zeros(numel, dtype=dtype)
        return t, t, None
    import numpy as np
    from numba import cuda

    import surogate.kernels  # noqa: F401  (applies the numba shims before numba.cuda is imported)

    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    cuda.select_device(device.index if device.index is not None else torch.cuda.current_device())
    owner = cuda.mapped_array(max(nbytes, 1), dtype=np.uint8, portable=True, wc=False)
    host = torch.from_numpy(np.asarray(owner))[:nbytes].view(dtype)
    pointer = owner.__cuda_array_interface__["data"][0]
    alias = torch.as_tensor(_Interface({"shape": (max(nbytes, 1),), "typestr": "|u1", "data": (pointer, False),
                                        "version": 3, "strides": None}))
    if not alias.is_cuda or alias.data_ptr() != pointer:
        raise RuntimeError(f"mapped host memory at {pointer:#x} did not become a CUDA tensor ({alias.device}): "
                           "set use_zero_copy: false")
    alias = alias[:nbytes].view(dtype)
    host.zero_()
    return host, alias, owner


@dataclass
class Buffer:
    """One per-parameter optimizer buffer: `data` is where it lives (a device tensor, or the host tensor when
    offloaded: what state_dict saves); `alias` the device-side view of offloaded memory (zero-copy); `per`
    parameters per element (1, or 2048 for the 8-bit absmax)."""

    data: torch.Tensor
    per: int = 1
    offloaded: bool = False
    alias: torch.Tensor | None = None
    owner: object = None

    @classmethod
    def allocate(cls, numel: int, dtype, device, *, offload: bool, per: int = 1, fill=0) -> Buffer:
        if not offload:
            return cls(torch.full((numel,), fill, dtype=dtype, device=device), per)
        host, alias, owner = host_buffer(numel, dtype, device)
        if fill:
            host.fill_(fill)
        return cls(host, per, True, alias, owner)

    def span(self, a: int, b: int) -> tuple[int, int]:
        """Elements holding parameters [a, b) (a a multiple of `per`)."""
        return a // self.per, -(-b // self.per)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class Streamer:
    """Chunks of the offloaded buffers through two device staging slots (see the module doc)."""

    buffers: list[Buffer]
    numel: int
    device: torch.device
    chunk: int = CHUNK
    slots: list[list[torch.Tensor]] = field(init=False)

    def __post_init__(self):
        if self.chunk % BLOCK:
            raise ValueError(f"offload chunk {self.chunk} must be a multiple of {BLOCK}")
        self.chunk = min(self.chunk, -(-self.numel // BLOCK) * BLOCK)
        self.slots = [[torch.empty(-(-self.chunk // b.per), dtype=b.data.dtype, device=self.device)
                       for b in self.buffers] for _ in range(2)]
        if self.device.type == "cuda":
            self.upload, self.download = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
            self.loaded = [torch.cuda.Event() for _ in range(2)]
            self.computed = [torch.cuda.Event() for _ in range(2)]
            self.freed = [torch.cuda.Event() for _ in range(2)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self.slots for t in slot)

    def chunks(self) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk, self.numel)) for a in range(0, self.numel, self.chunk)]

    def run(self, update) -> None:
        """update(a, b, views): views[k] holds buffers[k]'s elements for parameters [a, b), on the device."""
        if self.device.type != "cuda":
            for i, (a, b) in enumerate(self.chunks()):
                views = self._views(i % 2, a, b)
                for buf, view in zip(self.buffers, views, strict=True):
                    view.copy_(buf.data[slice(*buf.span(a, b))])
                update(a, b, views)
                for buf, view in zip(self.buffers, views, strict=True):
                    buf.data[slice(*buf.span(a, b))].copy_(view)
            return
        compute = torch.cuda.current_stream(self.device)
        self.upload.wait_stream(compute)  # fork from the (possibly capturing) compute stream
        self.download.wait_stream(compute)
        for i, (a, b) in enumerate(self.chunks()):
            s = i % 2
            views = self._views(s, a, b)
            with torch.cuda.stream(self.upload):
                if i >= 2:  # slot s is free once chunk i - 2 is back on the host
                    self.upload.wait_event(self.freed[s])
                for buf, view in zip(self.buffers, views, strict=True):
                    view.copy_(buf.data[slice(*buf.span(a, b))], non_blocking=True)
                self.loaded[s].record(self.upload)
            compute.wait_event(self.loaded[s])
            update(a, b, views)
            self.computed[s].record(compute)
            with torch.cuda.stream(self.download):
                self.download.wait_event(self.computed[s])
                for buf, view in zip(self.buffers, views, strict=True):
                    buf.data[slice(*buf.span(a, b))].copy_(view, non_blocking=True)
                self.freed[s].record(self.download)
        compute.wait_stream(self.upload)  # join: the step ends when every chunk is back on the host
        compute.wait_stream(self.download)

    def _views(self, slot: int, a: int, b: int) -> list[torch.Tensor]:
        out = []
        for buf, staging in zip(self.buffers, self.slots[slot], strict=True):
            lo, hi = buf.span(a, b)
            out.append(staging[: hi - lo])
        return out
