"""Rank 1 fails while rank 0 waits in a collective; the job must end (non-zero) instead of hanging.

    mpiexec -n 2 python tests/dist/workers/fail.py --mode raise|exit|kill|hang [--timeout 5]

raise: rank 1 raises ValueError -> abort_on_error aborts the job, naming rank 1.
exit:  rank 1 raises SystemExit(2) (a CLI config error) -> the job ends with an abort naming rank 1.
kill:  rank 1 dies by SIGKILL -> the launcher ends the job.
hang:  rank 1 sleeps outside any collective -> rank 0's collective times out after --timeout s (gloo raises),
       abort_on_error aborts the job, naming rank 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from datetime import timedelta

import surogate.dist as sd
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["raise", "exit", "kill", "hang"], required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with sd.abort_on_error():
        world = sd.init(args.device, timeout=timedelta(seconds=args.timeout))
        world.barrier()
        if world.rank == 1:
            if args.mode == "raise":
                raise ValueError("boom from the failure test")
            if args.mode == "exit":
                raise SystemExit(2)
            if args.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.mode == "hang":
                time.sleep(600)
        world.sum(torch.ones(4))  # rank 0 waits here for rank 1
        print(f"rank {world.rank} passed the collective: the failure did not stop the job", flush=True)
        sd.shutdown()


if __name__ == "__main__":
    main()
