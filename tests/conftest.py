"""Markers: `sim` tests run only in the simulator run (NUMBA_ENABLE_CUDASIM=1); `gpu` tests only where CUDA is;
`ptx` tests only where NVVM is (SUROGATE_REQUIRE_PTX=1 makes a missing NVVM a failure, as in CI)."""

import os

# Idle OpenMP threads sleep instead of spinning (read when torch loads libgomp, hence before `import torch`). On the
# shared 2-core dev machine, with other processes busy, spinning made CPU training steps 5-45x slower (quickstart, 200
# steps: 44-393 s spinning vs 9.9 s passive); on an idle machine passive costs ~2x on such tiny ops (300 steps: 7.7 s
# active vs 14.7 s passive), so the `surogate` command itself keeps OpenMP's default. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _nvvm_available() -> bool:
    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available() and not SIMULATOR
    nvvm = None
    for item in items:
        if "sim" in item.keywords and not SIMULATOR:
            item.add_marker(pytest.mark.skip(reason="simulator test: run with NUMBA_ENABLE_CUDASIM=1 -m sim"))
        if "sim" not in item.keywords and SIMULATOR:
            item.add_marker(pytest.mark.skip(reason="the simulator run only runs sim-marked tests"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "ptx" in item.keywords and not SIMULATOR:
            if nvvm is None:
                nvvm = _nvvm_available()
            if not nvvm and os.environ.get("SUROGATE_REQUIRE_PTX") != "1":
                item.add_marker(pytest.mark.skip(reason="NVVM not installed: pip install 'surogate-kernels[cu13]'"))


@pytest.fixture
def generator():
    """A freshly seeded generator per test: fresh inputs each run are drawn from the seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
