"""When each trainable parameter's gradient of a micro-step is complete, so that data-parallel steps can start its
reduction while backward goes on (inside the captured micro-step graph when CUDA graphs are on).

Autograd's post-accumulate-grad hooks fire once per accumulation into `.grad`. Within one backward a leaf used
twice (tied embeddings: lm_head and lookup) gets the sum of its gradients in one accumulation, after its last use;
a step that ran several backward passes would accumulate more often. So the first micro-step counts the
accumulations of each parameter, and from the second on a parameter is reported after that many.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch


class GradReadiness:
    """Calls `on_ready(param)` inside `micro_step(report=True)` blocks as each parameter's gradient completes."""

    def __init__(self, params: Iterable[torch.nn.Parameter], on_ready: Callable[[torch.nn.Parameter], None]):
        self.params = [p for p in params if p.requires_grad]
        self.on_ready = on_ready
        self.expected: dict[int, int] | None = None  # id(param) -> accumulations per micro-step, once learned
        self._seen: dict[int, int] = {}
        self._active = False
        self._report = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    @contextmanager
    def micro_step(self, report: bool) -> Iterator[None]:
        """One forward + backward; with `report`, on_ready is called for each parameter as it completes (from the
        second micro-step on: the first one learns the counts and reports nothing)."""
        self._seen, self._active, self._report = {}, True, report and self.expected is not None
        try:
            yield
        finally:
            self._active = self._report = False
        if self.expected is None:
            self.expected = dict(self._seen)

    def _hook(self, p: torch.Tensor) -> None:
        if not self._active:
            return
        n = self._seen.get(id(p), 0) + 1
        self._seen[id(p)] = n
        if self._report and n == self.expected.get(id(p)):
            self.on_ready(p)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
