"""offload_grads: ZeRO-2's fp32 gradient shard kept in (pinned) host memory, accumulated on the device.

After each micro-step's reduce-scatter, a bucket's reduced chunk is added to its span of the host shard through a
device staging buffer of one chunk: the span is copied in (not on its first write after `clear()`: the staging is
zeroed instead) and the chunk added there, on the current stream; the sum is copied back on a side stream, so that
it overlaps the next bucket's copy in (PCIe carries both directions at once) and whatever the current stream does
next. Two staging buffers alternate; events keep each buffer and each host span from being reused too early. The
optimizer step copies the whole shard to the device once (`on_device`). During forward and backward the device thus
holds two fp32 chunks instead of the shard; each micro-step moves the shard over PCIe twice (once on the first).
The additions are the same operations as the device-resident shard's (zero + chunk, then sum + chunk), so the
results are bit for bit the same. On a CPU world the "device" is the host: the same steps, with plain copies.
"""

from __future__ import annotations

import torch


class HostGradShard:
    """A flat fp32 gradient shard of `numel` elements in host memory; `chunk` is the largest span added at once."""

    def __init__(self, numel: int, chunk: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(numel, dtype=torch.float32, pin_memory=self.cuda)
        self.device = device
        self._stages = [torch.empty(chunk, dtype=torch.float32, device=device) for _ in range(2 if self.cuda else 1)]
        self._turn = 0
        self._written: set[int] = set()  # starts of the spans that hold this step's sums (others are stale)
        self._out = torch.cuda.Stream(device) if self.cuda else None  # copies back to the host
        self._stage_free: list[torch.cuda.Event | None] = [None] * len(self._stages)  # its last copy back done
        self._span_saved: dict[int, torch.cuda.Event] = {}  # span start -> its last copy back done
        self._last_saved: torch.cuda.Event | None = None
        self._on_device: torch.Tensor | None = None

    def add_(self, span: slice, reduced: torch.Tensor, alpha: float = 1.0) -> None:
        """host[span] += alpha * reduced (reduced: on the device, any float dtype), queued on the current stream
        and the copy-back stream."""
        host = self.host[span]
        slot, self._turn = self._turn, (self._turn + 1) % len(self._stages)
        stage = self._stages[slot][: host.numel()]
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        if self._stage_free[slot] is not None:
            current.wait_event(self._stage_free[slot])  # the buffer's previous sum has left for the host
        if span.start in self._written:
            if span.start in self._span_saved:
                current.wait_event(self._span_saved[span.start])  # the span's previous sum has arrived
            stage.copy_(host, non_blocking=True)
        else:
            stage.zero_()
        stage.add_(reduced, alpha=alpha)
        self._written.add(span.start)
        self._on_device = None
        if not self.cuda:
            host.copy_(stage)
            return
        self._out.wait_stream(current)  # after the addition (and after an earlier on_device read of the host)
        with torch.cuda.stream(self._out):
            host.copy_(stage, non_blocking=True)
            saved = torch.cuda.Event()
            saved.record()
        self._stage_free[slot] = self._span_saved[span.start] = self._last_saved = saved

    def on_device(self) -> torch.Tensor:
        """The shard on the device, copied once per step (after every queued addition)."""
        if self._on_device is None:
            if self._last_saved is not None:  # the copy-back stream runs in order: the last one implies the rest
                torch.cuda.current_stream(self.device).wait_event(self._last_saved)
            self._on_device = self.host.to(self.device, non_blocking=True)
        return self._on_device

    def clear(self) -> None:
        """Start a new sum: every span's next addition overwrites it (no host-side zeroing to wait for)."""
        self._written.clear()
        self._on_device = None
