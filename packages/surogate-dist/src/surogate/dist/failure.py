"""Fail fast: an error on one rank ends every rank, with a message naming the rank and the cause.

Without this, a rank that raises leaves the others blocked in their next collective until the timeout (or
forever in MPI calls). `abort_on_error` prints the traceback and one line `rank R failed: <Type>: <message>`
to stderr, then calls MPI.COMM_WORLD.Abort, which makes mpirun/mpiexec kill every rank on every node. A rank
that dies outright (SIGKILL, segfault, OOM killer) is handled by the launcher itself: it ends the job and names
the rank. A rank stuck outside collectives makes the others time out (`init(timeout=...)`): gloo raises (then
this handler aborts), NCCL tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING=1).
Outside mpirun the exception propagates unchanged.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .world import env_rank, launched_by_mpi

_FORWARD_GRACE_S = 1.0


@contextmanager
def abort_on_error(exit_code: int | Callable[[BaseException], int] = 1) -> Iterator[None]:
    """Context manager (or decorator) for a rank's entry point.

        with abort_on_error():
            world = init()
            train(world)

    Args:
        exit_code: the code passed to MPI Abort, or a function of the exception giving it (e.g. 2 for a
            config error). `SystemExit(0)` and `SystemExit(None)` pass through; any other SystemExit aborts with
            its code.
    """
    try:
        yield
    except SystemExit as exc:
        if exc.code in (None, 0) or not launched_by_mpi():
            raise
        code = exc.code if isinstance(exc.code, int) else 1
        _abort(f"exit code {exc.code}", code)
    except BaseException as exc:
        if not launched_by_mpi():
            raise
        traceback.print_exc()
        code = exit_code(exc) if callable(exit_code) else exit_code
        _abort(f"{type(exc).__name__}: {exc}", code)


def _abort(cause: str, code: int) -> None:
    rank = env_rank()
    from mpi4py import MPI  # noqa: PLC0415 (only under mpirun)

    if rank is None:
        rank = MPI.COMM_WORLD.Get_rank()
    sys.stdout.flush()
    print(f"rank {rank} failed: {cause} [host {socket.gethostname()}, pid {os.getpid()}]", file=sys.stderr, flush=True)
    # The launcher forwards each rank's output through a pipe and stops at the abort: give it a moment to pass on
    # the traceback and the line above (without it a long traceback was cut off, the rank line lost).
    time.sleep(_FORWARD_GRACE_S)
    MPI.COMM_WORLD.Abort(code)
