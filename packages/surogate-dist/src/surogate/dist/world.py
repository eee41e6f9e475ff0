"""Process bootstrap: rank, world size, local rank and node count from MPI, then torch.distributed.

`mpirun -n N python train.py` starts one process per GPU. A launch under MPI is recognised by the launcher's
environment variables (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK, ...), so a plain `python train.py` never
imports mpi4py: it is world size 1, with no process group. Under MPI:
- local rank / local size: a shared-memory split of COMM_WORLD (ranks on the same node);
- node count: the number of local rank 0s;
- rank 0 picks its address (127.0.0.1 on one node; on several, the address of its interface that routes to
  another node, or MASTER_ADDR) and a free port (or MASTER_PORT) and broadcasts them over MPI;
- torch.distributed starts over tcp:// with NCCL and one GPU per local rank (torch.cuda.set_device), or gloo
  on CPUs. NCCL collectives that do not finish within `timeout` tear the process down
  (TORCH_NCCL_ASYNC_ERROR_HANDLING=1); gloo ones raise.

Metrics helpers (`World.mean`, `sum`, `max`) all-reduce a small tensor in its own dtype (fp32 for losses).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

DEFAULT_TIMEOUT = timedelta(minutes=10)
TIMEOUT_ENV = "SUROGATE_DIST_TIMEOUT"  # seconds: overrides DEFAULT_TIMEOUT when init() is given no timeout

# Set by mpirun/mpiexec (OpenMPI, MPICH/Intel MPI hydra, PMIx launchers incl. srun --mpi=pmix, MVAPICH).
_MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")
_RANK_ENV_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


class DistError(RuntimeError):
    """A distributed setup the user can fix (GPU count, checkpoint world size, addresses); the message says how."""


def launched_by_mpi() -> bool:
    """True when this process was started by mpirun/mpiexec (judged from the environment, without importing MPI)."""
    return any(name in os.environ for name in _MPI_ENV_VARS)


def env_rank() -> int | None:
    """This process's MPI rank from the launcher's environment, or None outside MPI (no MPI import)."""
    return _env_int(_RANK_ENV_VARS)


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in os.environ:
            try:
                return int(os.environ[name])
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class World:
    """Where this process sits in the job. `is_main` (rank 0) alone writes logs, checkpoints and outputs."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    node_count: int
    device: torch.device
    backend: str | None  # "nccl", "gloo", or None for world size 1 (no process group)
    is_main: bool

    @property
    def nodes(self) -> int:
        """Alias of node_count."""
        return self.node_count

    # -- small collectives for metrics and setup -------------------------------------------------------------

    def sum(self, value: torch.Tensor | float) -> torch.Tensor | float:
        """Sum over ranks. A tensor comes back as a new tensor on its own device; a number as a float."""
        return self._reduce(value, tdist.ReduceOp.SUM, divide=False)

    def host_sum(self, value: int | float) -> int | float:
        """Sum of a host number over ranks through MPI: no GPU work and no device sync (for counts taken on the
        host, e.g. a step's tokens, so that the CPU keeps queueing GPU work ahead). Blocks until every rank calls."""
        if self.backend is None:
            return value
        from mpi4py import MPI  # noqa: PLC0415 (a world of several processes was started by MPI)

        return MPI.COMM_WORLD.allreduce(value)

    def mean(self, value: torch.Tensor | float) -> torch.Tensor | float:
        """Mean over ranks (loss, grad norm, tokens/s)."""
        return self._reduce(value, tdist.ReduceOp.SUM, divide=True)

    def max(self, value: torch.Tensor | float) -> torch.Tensor | float:
        """Max over ranks (peak memory, FP8 amax)."""
        return self._reduce(value, tdist.ReduceOp.MAX, divide=False)

    def barrier(self) -> None:
        if self.backend is not None:
            tdist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` from rank `src` on every rank (pickled: use it for small setup values, e.g. a run name)."""
        if self.backend is None:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def local_slice(self, n: int) -> slice:
        """This rank's rows of a global batch of `n` rows: rank r takes [r*n/W, (r+1)*n/W)."""
        if n % self.world_size:
            raise DistError(
                f"a global batch of {n} rows does not split over {self.world_size} ranks: "
                f"use a multiple of {self.world_size}"
            )
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def _reduce(self, value: torch.Tensor | float, op: tdist.ReduceOp, divide: bool) -> torch.Tensor | float:
        if isinstance(value, torch.Tensor):
            t = value.detach().to(self.device, copy=True)
        else:
            t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        if self.backend is not None:
            tdist.all_reduce(t, op=op)
        if divide:
            t = t / self.world_size
        if isinstance(value, torch.Tensor):
            return t.to(value.device)
        return float(t.item())


_WORLD: World | None = None


def init(device: str | torch.device | None = None, *, timeout: timedelta | None = None) -> World:
    """Start (or return the already started) world.

    Args:
        device: "cuda" (one GPU per local rank, NCCL), "cpu" (gloo) or None (cuda when available).
        timeout: how long a collective may wait for the other ranks before the job is ended (NCCL tears the
            process down, gloo raises; wrap the entry point in `abort_on_error` so the job ends). None: the
            SUROGATE_DIST_TIMEOUT environment variable (seconds), else DEFAULT_TIMEOUT (10 minutes).
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if timeout is None:
        timeout = _env_timeout()
    if not launched_by_mpi():
        _WORLD = World(0, 1, 0, 1, 1, _pick_device(device, 0, 1), None, True)
        return _WORLD

    from mpi4py import MPI  # noqa: PLC0415 (imported only under mpirun)

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    launched = _env_int(_SIZE_ENV_VARS)
    if launched is not None and launched != size:
        raise DistError(
            f"the launcher started {launched} processes but MPI sees a world of {size}: mpi4py loaded another MPI "
            f"library than the launcher's ({MPI.Get_library_version().split(',')[0].strip()}); launch with the "
            "mpiexec of that MPI, or point mpi4py at the launcher's library (MPI4PY_LIBMPI=/path/to/libmpi.so)"
        )
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    node_count = comm.allreduce(int(local_rank == 0))
    dev = _pick_device(device, local_rank, local_size)
    if size == 1:
        _WORLD = World(0, 1, 0, 1, 1, dev, None, True)
        return _WORLD

    names = comm.allgather(MPI.Get_processor_name()) if node_count > 1 else []
    found = _rendezvous(names) if rank == 0 else None
    found = comm.bcast(found, root=0)
    if found[0] == "error":
        raise DistError(found[1])
    _, host, port = found

    # Tear the process down when an NCCL collective times out or fails (instead of hanging);
    # NVLink SHARP (multicast) stays off unless the user turns it on: it needs fabric-manager multicast
    # support that containers and VMs often lack, and fails at the first collective there.
    # A collective's buffers are kept alive by its work object until wait() rather than by recordStream, so a
    # ZeRO-3 gather buffer freed after use is reused at once (also while a CUDA graph is being captured, where a
    # block with recorded stream uses is held until the capture ends). torch 2.7+ does so by default and warns
    # when the variable is set.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if _torch_before(2, 7):
        os.environ.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    address = f"[{host}]" if ":" in host else host
    tdist.init_process_group(
        backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=size, timeout=timeout, **kwargs
    )
    _WORLD = World(rank, size, local_rank, local_size, node_count, dev, backend, rank == 0)
    return _WORLD


def _torch_before(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) < (major, minor)


def _env_timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistError(f"{TIMEOUT_ENV}={value!r}: give the collective timeout in seconds, e.g. {TIMEOUT_ENV}=1800")
    return timedelta(seconds=seconds)


def shutdown() -> None:
    """Destroy the process group (if any); `init` may be called again afterwards."""
    global _WORLD
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _WORLD = None


def _pick_device(device: str | torch.device | None, local_rank: int, local_size: int) -> torch.device:
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise DistError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if not torch.cuda.is_available():
        raise DistError("device 'cuda' was asked for but torch sees no CUDA GPU: use device 'cpu' (gloo)")
    count = torch.cuda.device_count()
    if local_size > count:
        raise DistError(
            f"{local_size} ranks run on this node but only {count} GPU(s) are visible: start at most {count} "
            f"ranks per node (mpirun -n {count}, or -H host:{count} per node), one per GPU"
        )
    return torch.device("cuda", local_rank)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous(processor_names: list[str]) -> tuple[str, ...]:
    """On rank 0: ("ok", host, port) for the TCP store, or ("error", message) for every rank to raise."""
    port = int(os.environ.get("MASTER_PORT") or _free_port())
    if os.environ.get("MASTER_ADDR"):
        return ("ok", os.environ["MASTER_ADDR"], str(port))
    if not processor_names:  # one node
        return ("ok", "127.0.0.1", str(port))
    mine = processor_names[0]
    peers = [n for n in processor_names if n != mine]
    # The local address of the interface that routes to another node (a UDP connect sends nothing).
    for peer in peers[:1]:
        try:
            peer_ip = socket.gethostbyname(peer)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((peer_ip, 9))
                host = s.getsockname()[0]
            if not host.startswith("127."):
                return ("ok", host, str(port))
        except OSError:
            pass
    try:
        host = socket.gethostbyname(socket.gethostname())
    except OSError:
        host = "127.0.0.1"
    if host.startswith("127."):
        return (
            "error",
            f"rank 0 ({mine}) found no address the other nodes can reach (its hostname resolves to {host}): "
            "set MASTER_ADDR to rank 0's IP address on the network between the nodes and forward it "
            "(OpenMPI: mpirun -x MASTER_ADDR=...; MPICH: -genv MASTER_ADDR ...)",
        )
    return ("ok", host, str(port))
