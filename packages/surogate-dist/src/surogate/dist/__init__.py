"""surogate.dist: mpirun bootstrap, data parallel and ZeRO-1/2/3 over flat buffers (mpi4py + torch.distributed).

    world = init()                                   # world size 1 without mpirun; NCCL or gloo under it
    layout = FlatLayout(group_sizes, world.world_size)
    dp = DataParallel(world, layout, params, grads, zero=1, make_state=adam_state)
    with dp.micro_step(last=True):
        loss.backward()                              # grads reduced (bucketed, overlapped via grad_ready)
    dp.step(step_fn)                                 # step_fn(master, grads, state) on this rank's shard

ZeRO-3 for a model that takes a weights provider (CausalLM.weights_provider): GatheredParameters([(dp, parts)]).
"""

from .__about__ import __version__
from .data_parallel import DataParallel, all_reduce_grads, bind_parameters
from .failure import abort_on_error
from .gathered import GatheredParameters
from .layout import DEFAULT_BUCKET_NUMEL, Bucket, FlatLayout
from .sharded import ShardedParameters
from .world import DEFAULT_TIMEOUT, DistError, World, init, launched_by_mpi, shutdown

__all__ = [
    "DEFAULT_BUCKET_NUMEL",
    "DEFAULT_TIMEOUT",
    "Bucket",
    "DataParallel",
    "DistError",
    "FlatLayout",
    "GatheredParameters",
    "ShardedParameters",
    "World",
    "__version__",
    "abort_on_error",
    "all_reduce_grads",
    "bind_parameters",
    "init",
    "launched_by_mpi",
    "shutdown",
]
