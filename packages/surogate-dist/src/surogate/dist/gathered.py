"""ZeRO-3 for a model that computes through autograd Functions: sharded parameters gathered per part ahead of use,
freed after, gathered again for backward, their gradients reduce-scattered as soon as they are complete.

The model hands the parameters it is about to use to a provider, `provider(tensors) -> tensors` (CausalLM's
`weights_provider`); this object is that provider. Each trainable parameter lives in one *part* (a layout group
of one or more DataParallel engines built with zero=3 and bucket_numel=0, e.g. one engine per weight-decay group,
parts = embeddings, layer 0 .. L-1, final norm + head): a call returns, for every registered parameter it is
given, a view of its part's all-gathered weights (other tensors and None pass through unchanged), as the outputs
of one autograd Function (`_Gather`) whose inputs are the parameters themselves. With `sparse_lookup` the input
embedding lookup reads the shards instead (`embedding_lookup`, sharded_embedding.py): the table is gathered only for a
tied head, and its lookup gradient reaches the gradient shard without the dense reduce-scatter.

    forward   a call gathers its parts (waiting for a prefetch when one is in flight), releases every other
              gathered part (the previous layer) but one that `order` asks for again later (a tied embedding
              stays for the head: one gather instead of two) and prefetches the part that comes next in `order`.
    saved     inside `scope()`, saved-tensor hooks replace a gathered weight that a Function saves for backward
              by a token (part, offset, shape): the full weights are not kept alive from forward to backward.
    backward  a token is unpacked by gathering its part again (releasing the others) and prefetching the next
              lower part that still has tokens; `_Gather.backward` adds the weights' gradients into the engine's
              gradient scratch of the part and, once every use of the part in this micro-step has its
              gradient, calls `grad_ready(part)`: the part's reduce-scatter starts while backward goes on.

Numerics: the gathered weights are the shard's dtype (the model's, e.g. bf16: all-gathered bit for bit); their
gradients are summed in the scratch in that same dtype, as autograd sums a replicated parameter's uses at zero
0-2 (several uses of one part, e.g. tied embeddings, add up there), reduce-scattered in it (for a bf16 model half
the bytes of fp32) and added into the fp32 gradient shard. Between calls a registered parameter holds a 1-element
NaN placeholder expanded to its shape (no memory): code that reads it directly gets NaNs, never stale weights;
`unshard()` writes the full weights back into the parameters (collective) for saving and generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from .data_parallel import DataParallel
from .sharded_embedding import ShardedTable


class _Token:
    """What a saved gathered weight is replaced by between forward and backward."""

    __slots__ = ("key",)

    def __init__(self, key: tuple):
        self.key = key


class _Gather(torch.autograd.Function):
    """apply(owner, keys, *parameters) -> full weights (views of the gathered parts); backward: grads -> scratch."""

    @staticmethod
    def forward(ctx, owner: GatheredParameters, keys: tuple, track: bool, *params):
        ctx.set_materialize_grads(False)
        ctx.owner, ctx.keys, ctx.track = owner, keys, track
        return owner._gather_forward(keys, track)

    @staticmethod
    def backward(ctx, *grads):
        ctx.owner._accumulate(ctx.keys, grads, ctx.track)
        return (None, None, None, *(None for _ in grads))


class _ShardedLookup(torch.autograd.Function):
    """apply(owner, key, ids, table) -> the rows of the sharded table for ids; backward: into the gradient shard."""

    @staticmethod
    def forward(ctx, owner: GatheredParameters, key: tuple, ids: torch.Tensor, table: torch.Tensor):
        ctx.owner, ctx.key = owner, key
        ctx.save_for_backward(ids)
        return owner._table(key).lookup(ids)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        ctx.owner._lookup_backward(ctx.key, ids, grad)
        return None, None, None, None


class GatheredParameters:
    """The ZeRO-3 weights provider over one or more DataParallel engines (zero=3, bucket_numel=0).

    Args:
        engines: (dp, groups) pairs; groups[g] lists the parameters of dp's layout group g (the part g) in the
            order they were bound into the flat buffer (their sizes add up to the group's). Every engine has the
            same number of groups; a part may be empty in some engines.
        order: the parts in the order the model's forward asks for them (for prefetching), e.g. [0, 1, ..., L+1]
            (+ [0] when the head reuses the embeddings); default 0, 1, ..., n - 1. With sparse_lookup the lookup
            gathers nothing: [1, ..., L+1] (+ [0] for a tied head, which is then prefetched with part 1).
        sparse_lookup: `embedding_lookup` (the model calls it for its input embeddings) reads each rank's shard and
            reduces its gradient sparsely (sharded_embedding.py) in passes that build a graph. Every rank must then
            look up the same number of tokens per micro-step.
    """

    def __init__(self, engines: Sequence[tuple[DataParallel, Sequence[Sequence[torch.nn.Parameter]]]],
                 order: Sequence[int] | None = None, sparse_lookup: bool = False):
        if not engines:
            raise ValueError("GatheredParameters needs at least one engine")
        n_parts = len(engines[0][0].layout.group_sizes)
        self.engines = [dp for dp, _ in engines]
        self.n_parts = n_parts
        self.order = list(range(n_parts)) if order is None else [int(p) for p in order]
        self._where: dict[int, tuple[int, int, int, torch.Size]] = {}  # id(param) -> (engine, part, offset, shape)
        self._params: list[torch.nn.Parameter] = []
        for k, (dp, groups) in enumerate(engines):
            if dp.zero != 3 or dp.sharded is None:
                raise ValueError(f"engine {k} is zero={dp.zero}: GatheredParameters needs zero=3 engines")
            if len(groups) != n_parts or len(dp.layout.group_sizes) != n_parts:
                raise ValueError(f"engine {k} has {len(dp.layout.group_sizes)} groups ({len(groups)} given), "
                                 f"engine 0 has {n_parts}: every engine needs one group per part")
            if any(len(b.groups) != 1 for b in dp.layout.buckets):
                raise ValueError(f"engine {k}'s layout merges groups into buckets: build it with bucket_numel=0")
            for g, plist in enumerate(groups):
                offset = 0
                for p in plist:
                    self._where[id(p)] = (k, g, offset, p.shape)
                    self._params.append(p)
                    offset += p.numel()
                if offset != dp.layout.group_sizes[g]:
                    raise ValueError(f"engine {k} group {g}: parameters hold {offset} elements, the layout "
                                     f"{dp.layout.group_sizes[g]}")
        for p in self._params:  # the full copies the model was built with go away: placeholders, no gradient
            p.data = torch.full((1,), float("nan"), dtype=p.dtype, device=p.device).expand(p.shape)
            p.grad = None
        self._live: set[tuple[int, int]] = set()  # (engine, part) gathered now
        self._views: dict[tuple, tuple] = {}  # (data_ptr, shape, stride) of a handed-out weight -> its key
        self._uses: dict[tuple[int, int], int] = {}  # gathers in this micro-step's forward whose grads are pending
        self._packed: dict[tuple[int, int], int] = {}  # tokens saved and not yet unpacked
        self._cursor = -1  # position in `order` of the last forward gather
        self.sparse_lookup = sparse_lookup
        self._tables: dict[tuple, ShardedTable] = {}

    # -- the provider ---------------------------------------------------------------------------------------------

    def __call__(self, tensors: Sequence[torch.Tensor | None]) -> tuple:
        """The model's tensors with every registered parameter replaced by its gathered full weights."""
        hits = [i for i, t in enumerate(tensors) if t is not None and id(t) in self._where]
        if not hits:
            return tuple(tensors)
        keys = tuple(self._where[id(tensors[i])] for i in hits)
        track = torch.is_grad_enabled()
        outs = _Gather.apply(self, keys, track, *(tensors[i] for i in hits))
        result = list(tensors)
        for i, out in zip(hits, outs, strict=True):
            result[i] = out
        return tuple(result)

    def embedding_lookup(self, table: torch.nn.Parameter, ids: torch.Tensor) -> torch.Tensor | None:
        """The rows of a registered embedding `table` for `ids` (1-D int64) from the shards, without gathering it
        (sparse_lookup, passes with grad: collective), else None (the model then looks up the gathered table).
        Starts the gathers that forward needs next: the first part of `order`, then the table's part if the head
        reads it (the lookup's all-reduce goes first)."""
        if not (self.sparse_lookup and torch.is_grad_enabled()) or id(table) not in self._where:
            return None
        key = self._where[id(table)]
        rows = _ShardedLookup.apply(self, key, ids, table)
        for part in ([self.order[0]] if self.order else []) + ([key[1]] if key[1] in self.order else []):
            for dp in self.engines:
                if dp.layout.group_sizes[part] > 0:
                    dp.prefetch(part)
        return rows

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Around one micro-step's forward + backward (inside the engines' `micro_step` blocks): gathered weights
        saved for backward become tokens; every part is released at the end."""
        self._reset()
        with ExitStack() as stack:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
            yield
        self._reset()

    @torch.no_grad()
    def unshard(self, keep: bool = True) -> None:
        """Collective (every rank calls it): the full weights back into the parameters (when `keep`; else this
        rank only takes part in the gathers). The parameters are ordinary tensors afterwards: the provider must
        not be used any more."""
        self._reset()
        for k, dp in enumerate(self.engines):
            for g in range(self.n_parts):
                if dp.layout.group_sizes[g] == 0:
                    continue
                full = dp.gather(g)
                if keep:
                    for p in self._params:
                        pk, pg, offset, shape = self._where[id(p)]
                        if (pk, pg) == (k, g):
                            p.data = full[offset : offset + shape.numel()].clone().view(shape)
                dp.release(g)

    # -- gathering ------------------------------------------------------------------------------------------------

    def _gather_forward(self, keys: tuple, track: bool) -> tuple[torch.Tensor, ...]:
        parts = sorted({(k, g) for k, g, _, _ in keys})
        nxt = self._next_in_order({g for _, g in parts})
        again = set(self.order[self._cursor + 1 :])  # parts this forward asks for again (a tied embedding)
        self._release_except(set(parts) | {p for p in self._live if p[1] in again})
        for key in parts:
            self._gather(*key)
            if track:
                self._uses[key] = self._uses.get(key, 0) + 1
        if nxt is not None:
            for k, dp in enumerate(self.engines):
                if (k, nxt) not in self._live and dp.layout.group_sizes[nxt] > 0:
                    dp.prefetch(nxt)
        outs = []
        for key in keys:
            w = self._view(key)
            self._views[(w.data_ptr(), tuple(w.shape), w.stride())] = key
            outs.append(w)
        return tuple(outs)

    def _next_in_order(self, parts: set[int]) -> int | None:
        """The part after this gather in `order`, searching forward from the last position (then wrapping)."""
        n = len(self.order)
        for step in range(1, n + 1):
            j = (self._cursor + step) % n
            if self.order[j] in parts:
                self._cursor = j
                return self.order[j + 1] if j + 1 < n else None
        return None

    def _gather(self, k: int, g: int) -> torch.Tensor:
        full = self.engines[k].gather(g)
        self._live.add((k, g))
        return full

    def _view(self, key: tuple) -> torch.Tensor:
        k, g, offset, shape = key
        return self.engines[k].gather(g)[offset : offset + shape.numel()].view(shape)

    def _release_except(self, keep: set[tuple[int, int]]) -> None:
        for key in list(self._live):
            if key not in keep:
                self.engines[key[0]].release(key[1])
                self._live.discard(key)
        self._views = {v: key for v, key in self._views.items() if key[:2] in keep}

    def _reset(self) -> None:
        self._release_except(set())
        for dp in self.engines:  # a prefetch nobody used: waited for (a CUDA-graph capture must join it)
            dp.sharded.release_all()
        self._uses.clear()
        self._packed.clear()
        self._cursor = -1

    # -- saved tensors --------------------------------------------------------------------------------------------

    def _pack(self, t: torch.Tensor):
        key = self._views.get((t.data_ptr(), tuple(t.shape), t.stride())) if t.numel() else None
        if key is None:
            return t.detach()  # not t: a node saving its own output would hold itself (a cycle that outlives backward)
        part = key[:2]
        self._packed[part] = self._packed.get(part, 0) + 1
        return _Token(key)

    def _unpack(self, saved):
        if not isinstance(saved, _Token):
            return saved
        k, g = part = saved.key[:2]
        self._packed[part] -= 1
        if part not in self._live:
            self._release_except({key for key in self._live if key[1] == g})
            self._gather(k, g)
        # the next part backward will need (also when this one was still live from forward, as the head is at the
        # start of backward): its all-gather overlaps this part's backward; a no-op once it is in flight
        lower = [q for (kk, q), n in self._packed.items() if n > 0 and q < g and (kk, q) not in self._live]
        if lower:
            nxt = max(lower)
            for (kk, q), n in self._packed.items():
                if q == nxt and n > 0:
                    self.engines[kk].prefetch(q)
        return self._view(saved.key)

    # -- gradients ------------------------------------------------------------------------------------------------

    def _table(self, key: tuple) -> ShardedTable:
        if key not in self._tables:
            k, g, offset, shape = key
            self._tables[key] = ShardedTable(self.engines[k], g, offset, shape)
        return self._tables[key]

    def _lookup_backward(self, key: tuple, ids: torch.Tensor, grad: torch.Tensor) -> None:
        self._table(key).add_grad(ids, grad)
        part = key[:2]
        if part not in self._uses:  # no dense use of the part in this micro-step (an untied embedding): no reduction
            self.engines[part[0]].skip_reduction(part[1])

    def _accumulate(self, keys: tuple, grads: tuple, track: bool) -> None:
        for key, grad in zip(keys, grads, strict=True):
            if grad is None:
                continue
            k, g, offset, shape = key
            self.engines[k].accumulate_grad(g, offset, grad)
        if not track:
            return
        for part in sorted({key[:2] for key in keys}):
            self._uses[part] -= 1
            if self._uses[part] == 0:
                self.engines[part[0]].grad_ready(part[1])
