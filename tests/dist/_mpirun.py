"""mpirun command lines for the dist tests: MPICH (hydra) or OpenMPI, found next to the interpreter or on PATH.

MPICH: `-launcher fork` starts the ranks as local children (no ssh; works in containers).
OpenMPI: `--oversubscribe` (more ranks than cores on a 2-core CI box) and, as root, `--allow-run-as-root`.
SUROGATE_MPIEXEC=/path/to/mpiexec picks a launcher explicitly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"
NO_MPIEXEC = "no mpiexec found (next to the interpreter, on PATH or in SUROGATE_MPIEXEC): pip install mpich"


@cache
def find_mpiexec() -> str | None:
    explicit = os.environ.get("SUROGATE_MPIEXEC")
    if explicit:
        return explicit
    for name in ("mpiexec", "mpirun"):
        beside = Path(sys.executable).parent / name
        if beside.exists():
            return str(beside)
    return shutil.which("mpiexec") or shutil.which("mpirun")


@cache
def mpi_flavor(mpiexec: str) -> str:
    """'mpich', 'openmpi' or 'unknown', from `mpiexec --version`."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "Open MPI" in text or "OpenRTE" in text or "prterun" in text or "PRRTE" in text:
        return "openmpi"
    if "HYDRA" in text or "MPICH" in text:
        return "mpich"
    return "unknown"


def mpirun_command(n: int, argv: list[str], mpiexec: str | None = None) -> list[str]:
    mpiexec = mpiexec or find_mpiexec()
    if mpiexec is None:
        raise RuntimeError(NO_MPIEXEC)
    cmd = [mpiexec, "-n", str(n)]
    flavor = mpi_flavor(mpiexec)
    if flavor == "mpich":
        cmd += ["-launcher", "fork"]
    elif flavor == "openmpi":
        cmd.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    return cmd + argv


def run_worker(n: int, worker: str, args: list[str], timeout: float = 120, env: dict | None = None):
    """Run tests/dist/workers/<worker> on n ranks; returns (CompletedProcess, seconds). Output is captured."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = mpirun_command(n, [sys.executable, str(WORKERS / worker), *args])
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc, time.monotonic() - start
