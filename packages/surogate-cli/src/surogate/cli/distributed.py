"""`mpirun -n N surogate sft cfg.yaml`: the trainer's data parallelism, on top of surogate.dist.

One process per GPU (gloo on CPUs). A plain `surogate sft` is world size 1: `Processes.start` imports neither
surogate.dist nor MPI then, and every method below is the identity or a no-op, so the single-process trainer runs
exactly as before.

What changes with N ranks (zero_level 0 = plain data parallel, 1 = optimizer state sharded, 2 = + gradients
sharded, 3 = + weights sharded):
- Data: the step's window of rows is the same as one process with N times the micro-batch, [accumulation,
  N * micro_batch]; rank r takes columns r, r + N, ... of it (`shard_rows`), so each micro-batch of the N ranks
  together is exactly the 1-process micro-batch.
- Loss normaliser: each rank counts the trained tokens of its rows on the host; the world's sum (MPI on the host:
  no device sync) is the window's count, so every micro-step backpropagates loss_sum / (tokens of the whole global
  window) and the gradients are SUMMED over ranks (no averaging). The reported loss is the world's loss sum over
  that count, the grad norm that of the reduced gradients: both global.
- Gradients, reduced while backward runs (the step classes: surogate.cli.data_parallel_step): in the window's last
  micro-step (every micro-step at zero 2) each bucket of the flat gradient buffers is reduced as soon as backward has
  completed all of its parameters' grads (surogate.cli.grad_ready: post-accumulate-grad hooks) and waited for at the
  micro-step's end, all inside the micro-step, so inside its CUDA graph when graphs are on (NCCL collectives are
  captured and replayed; that micro-step has a graph of its own). zero 0: buckets of ~DEFAULT_BUCKET_NUMEL elements of
  whole parameters, all-reduced (summed) in the buffer's dtype; zero 1/2: surogate.dist.DataParallel's buckets,
  reduce-scattered into each group's fp32 shard (zero 2 adds each micro-step's into it and zeroes the full buffer,
  which is then scratch for one micro-step). At zero 1/2 each rank keeps the fp32 master and AdamW moments of its
  shard only, runs surogate.kernels.adamw_step on it, and the updated shards are all-gathered into the weights; that
  optimizer step runs collectives, so it is never captured as a CUDA graph. offload_grads (zero 2 only): the fp32
  shard lives in host memory and each micro-step's sum passes through one-chunk device buffers (copy in, add,
  copy back): that reduction runs after each micro-step's replay, outside its graph, without overlap.
- zero 3: each weight-decay group's trainable weights are sharded by *part* (embeddings, layer 0 .. L-1, final
  norm + lm_head; with LoRA only the adapters are trainable: the frozen base weights stay replicated); the model's
  weights_provider (surogate.dist.GatheredParameters) all-gathers a layer's weights before its forward, frees
  them after, gathers them again for its backward (prefetching one layer ahead both ways) and reduce-scatters its
  gradients as soon as they are complete, all inside the micro-step, so inside its CUDA graph (the Python that
  drives the gathers runs at capture; replays repeat its collectives). Evaluation runs on every rank (each forward
  gathers, eagerly); at the end
  `unshard` gathers the trained weights into rank 0's model, which saves them.
- Start: every rank builds the same model (same seed) and rank 0's trainable weights are broadcast anyway.
- Only rank 0 (`is_main`) writes: output_dir, logs, metrics, checkpoints (gathered: the same files as one
  process writes, resumable at the same world size), the final model. Rank 0 tokenises first; the other ranks
  then reuse its output_dir/tokenized (single node, or output_dir on a shared file system).
- Failure: `guard()` wraps the command: an exception on any rank prints `rank R failed: ...` and MPI-aborts the
  job (exit code 2 for a user error, else 1). SUROGATE_TEST_FAIL_RANK=r makes rank r raise at step 2 (tests).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch

from .data_parallel_step import DataParallelStep, Zero2Step, Zero3Step, ZeroStep
from .errors import NotSupportedYet, UserError
from .step import TrainStep

SUPPORTED_ZERO = (0, 1, 2, 3)

# set by MPI launchers (OpenMPI, MPICH/Intel MPI hydra, PMIx, MVAPICH): the same list as surogate.dist.world
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in _MPI_ENV)


def unsupported_launch_processes() -> int:
    """Processes started by a launcher other than MPI (torchrun sets WORLD_SIZE): refused by check_supported,
    since surogate.dist bootstraps from MPI. 1 for a plain command or an mpirun launch."""
    if launched_by_mpi():
        return 1
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() else 1


@contextmanager
def guard():
    """Around a whole command: under mpirun an error on one rank ends every rank (rank named); else nothing."""
    if not launched_by_mpi():
        yield
        return
    from surogate.dist import abort_on_error

    with abort_on_error(exit_code=lambda e: 2 if isinstance(e, UserError) or _is_model_error(e) else 1):
        yield


def _is_model_error(e: BaseException) -> bool:
    import sys

    error = getattr(sys.modules.get("surogate.models"), "ModelError", None)
    return error is not None and isinstance(e, error)


class Processes:
    """The run's processes: world size, this rank, and the data-parallel pieces the trainer calls."""

    def __init__(self, device, world=None, zero_level: int = 0, offload_grads: bool = False):
        self.world = world  # surogate.dist.World, or None in a single process
        self.device = device if world is None else world.device
        self.rank = 0 if world is None else world.rank
        self.world_size = 1 if world is None else world.world_size
        self.is_main = self.rank == 0
        self.zero_level = zero_level if self.world_size > 1 else 0
        self.offload_grads = offload_grads and self.zero_level == 2
        self.gathered = None  # zero 3: the model's weights provider (surogate.dist.GatheredParameters)
        self._steps: list[TrainStep] = []  # their CUDA graphs are freed before the process group goes

    @classmethod
    def start(cls, device, zero_level: int, offload_grads: bool = False) -> Processes:
        """World size 1 without mpirun (no MPI import); else surogate.dist.init on `device`'s type."""
        if not launched_by_mpi():
            _check_offload_grads(offload_grads, 1)
            return cls(device)
        import surogate.dist as sd

        world = sd.init(device.type)
        if world.world_size > 1 and zero_level not in SUPPORTED_ZERO:
            raise NotSupportedYet(f"zero_level {zero_level} not supported yet (data parallel over "
                                  f"{world.world_size} processes)", key="zero_level",
                                  fix="zero_level: 1 (optimizer state sharded) or 0 (plain data parallel)")
        _check_offload_grads(offload_grads, world.world_size)
        return cls(device, world, zero_level, offload_grads)

    @property
    def evaluates(self) -> bool:
        """Whether this rank runs evaluation: rank 0 alone, or every rank at zero 3 (each forward gathers)."""
        return self.is_main or self.gathered is not None

    # -------------------------------------------------------------------------------------- setup and writing
    def main_first(self):
        """A block rank 0 runs before the others (tokenising into the shared cache): `with p.main_first(): ...`."""
        return nullcontext() if self.world_size == 1 else _main_first(self.world)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.world.barrier()

    def describe(self) -> str:
        if self.world_size == 1:
            return ""
        w = self.world
        text = (f"data parallel: {w.world_size} processes on {w.node_count} node(s), {w.backend}, "
                f"zero_level {self.zero_level}")
        if self.offload_grads:
            text += (", gradient shards in host memory (offload_grads): summed after each micro-step, outside its "
                     "CUDA graph (with use_cuda_graphs), not overlapped with backward")
        return text

    # -------------------------------------------------------------------------------------- data
    def shard_rows(self, rows):
        """[accumulation, world_size * micro_batch] row indices of the global window -> this rank's
        [accumulation, micro_batch]: columns rank, rank + world_size, ..."""
        if self.world_size == 1:
            return rows
        return rows[:, self.rank :: self.world_size]

    # -------------------------------------------------------------------------------------- model and step
    def shard_groups(self, groups: list, model=None) -> list:
        """TrainStep's weight-decay groups as this world needs them: unchanged in one process; at zero 0 rank 0's
        weights broadcast; at zero 1/2 rebound to padded buffers with sharded master + AdamW state (ShardedGroup);
        at zero 3 the weights sharded by part too, and `model.weights_provider` set (needs `model`)."""
        if self.world_size == 1:
            return groups
        import torch.distributed as tdist

        if self.zero_level == 0:
            for g in groups:
                tdist.broadcast(g.work, src=0)
                if g.master is not g.work:
                    g.master.copy_(g.work)
            return groups
        if self.zero_level < 3:
            return [ShardedGroup(self.world, g, self.zero_level, offload_grads=self.offload_grads) for g in groups]
        import surogate.dist as sd

        part_of, order = model_parts(model)
        n_parts = model.config.num_layers + 2
        sharded = [ShardedGroup(self.world, g, 3, part_of=part_of, n_parts=n_parts) for g in groups]
        # the trainer's micro-batches have one shape on every rank: the embedding lookup can read the shards
        self.gathered = sd.GatheredParameters([(g.dp, g.parts) for g in sharded], order, sparse_lookup=True)
        model.weights_provider = self.gathered
        return sharded

    def train_step(self, model, groups: list, **kwargs) -> TrainStep:
        if self.world_size == 1:
            return TrainStep(model, groups, **kwargs)
        if self.zero_level == 0:
            step = DataParallelStep(self.world, model, groups, **kwargs)
        elif self.zero_level == 1:
            step = ZeroStep(self.world, model, groups, **kwargs)
        elif self.zero_level == 2:
            step = Zero2Step(self.world, model, groups, **kwargs)
        else:
            step = Zero3Step(self.world, model, groups, gathered=self.gathered, **kwargs)
        self._steps.append(step)
        return step

    def unshard(self, model) -> None:
        """zero 3, at the end (collective): the trained weights into rank 0's model (the provider is removed, so
        rank 0 saves and generates as one process does); a no-op otherwise."""
        if self.gathered is None:
            return
        self.gathered.unshard(keep=self.is_main)
        model.weights_provider = None
        self.gathered = None

    def shutdown(self) -> None:
        if self.world_size > 1:
            import surogate.dist as sd

            for step in self._steps:  # their graphs captured NCCL collectives
                step.release_graphs()
            self._steps = []
            sd.shutdown()


@contextmanager
def _main_first(world):
    if not world.is_main:
        world.barrier()
    try:
        yield
    finally:
        if world.is_main:
            world.barrier()


def model_parts(model) -> tuple[dict[int, int], list[int]]:
    """ZeRO-3 parts of a surogate.models CausalLM: id(parameter) -> part (0 = embeddings, 1 + i = layer i,
    L + 1 = final norm + lm_head), and the order its training forward gathers them: the layers and the head, then
    part 0 again for a tied head (the input lookup reads the shards: GatheredParameters' sparse_lookup)."""
    n = model.config.num_layers
    part_of = {}
    for name, p in model.named_parameters():
        if name.startswith("model.embed_tokens."):
            part_of[id(p)] = 0
        elif name.startswith("model.layers."):
            part_of[id(p)] = 1 + int(name.split(".")[2])
        elif name.startswith(("model.norm.", "lm_head.")):
            part_of[id(p)] = n + 1
        else:
            raise ValueError(f"zero_level 3: parameter {name!r} belongs to no part (embeddings, layers, head)")
    order = list(range(1, n + 2)) + ([0] if model.config.tie_word_embeddings else [])
    return part_of, order


def _check_offload_grads(offload_grads: bool, world_size: int) -> None:
    if offload_grads and world_size < 2:
        raise NotSupportedYet("offload_grads keeps the ZeRO-2 gradient shards of data-parallel ranks in host memory; "
                              "this run is a single process", key="offload_grads",
                              fix="launch with mpirun -n N (N >= 2) and zero_level: 2, or set offload_grads: false")


class ShardedGroup:
    """A TrainStep weight-decay group at ZeRO-1/2: the trainable parameters are views into a padded flat work
    buffer (surogate.dist.FlatLayout, one layout group per parameter) and their .grad views into a padded flat grad
    buffer; `dp` (surogate.dist.DataParallel) holds this rank's fp32 master shard and AdamW moments. `master`,
    `exp_avg`, `exp_avg_sq` are those shards. state_dict / load_state_dict use the full unpadded tensors in
    parameter order (the single-process checkpoint format) and are collective.

    ZeRO-3 (`part_of`: id(parameter) -> part, see model_parts): one layout group per part, one bucket each; no full
    weights or gradients stay: `work` is this rank's weight shard in the model dtype, `grad` None, `parts[g]` the
    parameters of part g (for surogate.dist.GatheredParameters, which replaces them with placeholders). The
    unpadded canonical order is still parameter order (parts follow the model's parameter order)."""

    optimizer = "adamw"  # as ParamGroup's (memory_report): the sharded step is fp32 AdamW on device-resident shards
    offload_method = None  # nothing is reached through mapped host memory (offload_grads copies through the device)

    def __init__(self, world, group, zero: int, *, offload_grads: bool = False, part_of: dict | None = None,
                 n_parts: int = 0):
        import surogate.dist as sd

        for key, value, default in (("optimizer", getattr(group, "optimizer", "adamw"), "adamw"),
                                    ("offload_master", getattr(group, "offload_master", False), False),
                                    ("offload_optimizer", getattr(group, "offload_optimizer", False), False)):
            if value != default:  # the sharded step below is fp32 AdamW on device-resident shards
                raise NotSupportedYet(f"{key}: {value} with zero_level {zero} under mpirun", key=key,
                                      fix=f"{key}: {default}, or zero_level: 0 (plain data parallel)")
        self.params, self.weight_decay = group.params, group.weight_decay
        if zero == 3:
            self.parts = [[] for _ in range(n_parts)]
            for p in self.params:
                self.parts[part_of[id(p)]].append(p)
            if [id(p) for part in self.parts for p in part] != [id(p) for p in self.params]:
                raise ValueError("zero_level 3: the parts do not follow the parameter order")
            layout = sd.FlatLayout([sum(p.numel() for p in part) for part in self.parts], world.world_size,
                                   bucket_numel=0)
            groups = self.parts
        else:
            layout = sd.FlatLayout([p.numel() for p in self.params], world.world_size)
            groups = [[p] for p in self.params]
        work = torch.zeros(layout.numel, dtype=group.work.dtype, device=group.work.device)
        grad = torch.zeros_like(work) if zero < 3 else None
        sd.bind_parameters(layout, groups, work, grad)
        self.dp = sd.DataParallel(world, layout, work, grad, zero=zero, average=False, offload_grads=offload_grads,
                                  make_state=lambda m: {"exp_avg": torch.zeros_like(m),
                                                        "exp_avg_sq": torch.zeros_like(m)})
        self.work = work if zero < 3 else (self.dp.work if self.dp.work is not None else self.dp.master)
        self.grad = grad
        self.master = self.dp.master
        self.exp_avg, self.exp_avg_sq = self.dp.state["exp_avg"], self.dp.state["exp_avg_sq"]

    def memory(self) -> dict[str, dict[str, int]]:
        """This rank's bytes per kind ({"device": {...}, "host": {...}}), as ParamGroup.memory: the weights the model
        reads (zero 3: the shard), the full gradient scratch (zero 1/2), the fp32 gradient shard (host memory with
        offload_grads), the fp32 master and AdamW shards."""
        out = {"device": {}, "host": {}}

        def add(where, kind, t):
            out[where][kind] = out[where].get(kind, 0) + t.numel() * t.element_size()

        add("device", "weights", self.work)
        if self.grad is not None:
            add("device", "grads", self.grad)
        add("host" if self.dp.offload_grads else "device", "grad shard", self.dp.grad_shard)
        if self.master is not self.work:
            add("device", "master", self.master)
        add("device", "optimizer", self.exp_avg)
        add("device", "optimizer", self.exp_avg_sq)
        return out

    def state_dict(self) -> dict:
        """Full tensors on rank 0's CPU; the same keys with None on the other ranks (every rank must call it)."""
        full = self.dp.full_state(0)
        return full if full is not None else dict.fromkeys(("master", "exp_avg", "exp_avg_sq"))

    def load_state_dict(self, state: dict) -> None:
        n = self.dp.layout.canonical_numel
        for name, t in state.items():
            if t.numel() != n:
                raise ValueError(f"optimizer state `{name}` has {t.numel()} values, expected {n}")
        self.dp.load_full_state(state)


class QuietLog:
    """RunLog's interface for ranks other than 0: they print and write nothing."""

    def __init__(self, *args, **kwargs):
        from rich.console import Console

        self.console = Console(quiet=True)

    def info(self, text: str) -> None:
        pass

    def rule(self, text: str) -> None:
        pass

    def start_progress(self, total: int, done: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def stop_progress(self) -> None:
        pass

    def step(self, record: dict, *, total: int, print_line: bool) -> None:
        pass

    def eval(self, record: dict) -> None:
        pass

    def final(self, record: dict) -> None:
        pass

    def plot(self) -> None:
        pass

    def close(self) -> None:
        pass
