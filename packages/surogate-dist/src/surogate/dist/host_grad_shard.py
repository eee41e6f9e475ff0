"""offload_grads: ZeRO-2's fp32 gradient shard kept in (pinned) host memory, accumulated on the device.

After each micro-step's reduce-scatter, a bucket's reduced chunk is added to its span of the host shard through a
device staging buffer of one chunk: the span is copied in (not on its first write after `clear()`: the staging is
zeroed instead), the chunk is added there, and the sum is copied back, all queued on the current stream. The
optimizer step copies the whole shard to the device once (`on_device`). During forward and backward the device
thus holds one fp32 chunk instead of the shard; each micro-step moves the shard over PCIe twice (once on the first).
The additions are the same operations as the device-resident shard's (zero + chunk, then sum + chunk), so the
results are bit for bit the same. On a CPU world the "device" is the host: the same code, with plain copies.
"""

from __future__ import annotations

import torch


class HostGradShard:
    """A flat fp32 gradient shard of `numel` elements in host memory; `chunk` is the largest span added at once."""

    def __init__(self, numel: int, chunk: int, device: torch.device):
        pinned = device.type == "cuda"
        self.host = torch.zeros(numel, dtype=torch.float32, pin_memory=pinned)
        self.device = device
        self._stage = torch.empty(chunk, dtype=torch.float32, device=device)
        self._written: set[int] = set()  # starts of the spans that hold this step's sums (others are stale)
        self._copied = torch.cuda.Event() if pinned else None  # the last copy back to the host
        self._on_device: torch.Tensor | None = None

    def add_(self, span: slice, reduced: torch.Tensor, alpha: float = 1.0) -> None:
        """host[span] += alpha * reduced (reduced: on the device, any float dtype), queued on the current stream."""
        host = self.host[span]
        stage = self._stage[: host.numel()]
        if span.start in self._written:
            stage.copy_(host, non_blocking=True)
        else:
            stage.zero_()
        stage.add_(reduced, alpha=alpha)
        host.copy_(stage, non_blocking=True)
        self._written.add(span.start)
        if self._copied is not None:
            self._copied.record()
        self._on_device = None

    def on_device(self) -> torch.Tensor:
        """The shard on the device, copied once per step (after every queued addition)."""
        if self._on_device is None:
            if self._copied is not None:
                torch.cuda.current_stream(self.device).wait_event(self._copied)
            self._on_device = self.host.to(self.device, non_blocking=True)
        return self._on_device

    def clear(self) -> None:
        """Start a new sum: every span's next addition overwrites it (no host-side zeroing to wait for)."""
        self._written.clear()
        self._on_device = None
