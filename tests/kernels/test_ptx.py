"""Every kernel signature compiles to PTX for sm_90 on this (CPU) machine: typing and lowering, which the
simulator never does. Needs NVVM (numba-cuda[cu13])."""

import importlib
import pkgutil

import pytest

import surogate.kernels.ops as ops_package
from surogate.kernels import Kernel

for module in pkgutil.iter_modules(ops_package.__path__):
    importlib.import_module(f"{ops_package.__name__}.{module.name}")


@pytest.mark.ptx
@pytest.mark.parametrize("kernel", Kernel.registry, ids=lambda k: k.name)
def test_compiles_for_sm90(kernel):
    ptx = kernel.ptx(cc=(9, 0))
    assert ".target sm_90" in ptx
    assert ".local" not in ptx, f"{kernel.name} spills to local memory"
