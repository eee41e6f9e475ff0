"""Registers and spills of every registered kernel as ptxas assembles it for sm_90, on a machine without a GPU.

test_ptx.py checks the PTX for `.local` (local arrays numba failed to promote); register spills happen later, in
ptxas, and only show here. Needs `ptxas` on PATH (a CUDA toolkit); NVVM may emit a newer PTX ISA than that ptxas
knows, so the `.version` line is lowered to 9.0 (fine while the kernels use no newer PTX features).

Usage: python tools/bench/ptxas_report.py [name-substring ...]
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

import surogate.kernels.ops as ops_package
from surogate.kernels import Kernel


def main():
    for module in pkgutil.iter_modules(ops_package.__path__):
        importlib.import_module(f"{ops_package.__name__}.{module.name}")
    wanted = sys.argv[1:]
    for kernel in Kernel.registry:
        if wanted and not any(w in kernel.name for w in wanted):
            continue
        ptx = re.sub(r"\.version \d+\.\d+", ".version 9.0", kernel.ptx())
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            result = subprocess.run(["ptxas", "-arch=sm_90", "-v", f.name, "-o", os.devnull],
                                    capture_output=True, text=True)
        finally:
            os.unlink(f.name)
        info = " ".join(line.split(":", 1)[-1].strip() for line in result.stderr.splitlines()
                        if "Used" in line or "spill" in line or "rror" in line)
        print(f"{kernel.name:45} {info}")


if __name__ == "__main__":
    main()
