"""Every surogate.quant kernel signature compiles to PTX for sm_90 on this (CPU) machine, with no local-memory
spills: typing and lowering, which the simulator never does. Needs NVVM (numba-cuda[cu13])."""

import importlib
import pkgutil

import pytest

import surogate.quant as quant_package
from surogate.kernels import Kernel

for module in pkgutil.walk_packages(quant_package.__path__, prefix="surogate.quant."):
    importlib.import_module(module.name)

QUANT_KERNELS = [k for k in Kernel.registry if k.pyfunc.__module__.startswith("surogate.quant.")]


def test_quant_kernels_are_registered():
    modules = {k.pyfunc.__module__ for k in QUANT_KERNELS}
    assert "surogate.quant.fp8" in modules


@pytest.mark.ptx
@pytest.mark.parametrize("kernel", QUANT_KERNELS, ids=lambda k: k.name)
def test_compiles_for_sm90(kernel):
    ptx = kernel.ptx(cc=(9, 0))
    assert ".target sm_90" in ptx
    assert ".local" not in ptx, f"{kernel.name} spills to local memory"
