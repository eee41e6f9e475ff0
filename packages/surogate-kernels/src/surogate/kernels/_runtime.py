"""The one module that knows numba-cuda's quirks: import order, streams, bf16 bits, reductions, lazy compiles.

Every op module imports numba only through here, so that:
- the NumPy 2.5 shim (`np.row_stack`, removed in 2.5, still referenced by numba-cuda 0.30.4) and
  NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0 (a CAI stream sync is illegal inside CUDA-graph capture) are in place
  before the first `numba.cuda` import;
- kernels launch on torch's current stream, so they order with torch ops and are captured by torch.cuda.graph;
- kernels compile for explicit signatures on first CUDA use (an explicit signature skips per-call typing,
  measured 49 us vs 139 us a launch on the H100), never at import, so importing works on CPU-only machines;
- bf16 travels as int16 bits (`t.view(torch.int16)`), widened and narrowed by bit arithmetic that also runs in
  the CUDA simulator (which has no bf16 type and no warp shuffles).
"""

from __future__ import annotations

import math
import os

import numpy as np

os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
if not hasattr(np, "row_stack"):  # NumPy >= 2.5 removed it; numba-cuda 0.30.4 still registers an overload for it.
    np.row_stack = np.vstack

import torch  # noqa: E402
from numba import config as numba_config  # noqa: E402
from numba import cuda, float32, int16, int32, uint32  # noqa: E402

numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0  # small grids (e.g. a column reduction) are intended

SIMULATOR: bool = bool(cuda.config.ENABLE_CUDASIM)
WARP = 32
# Shared scratch for block_sum: one slot per warp on the GPU; one per thread in the simulator (tree reduction).
REDUCE_SLOTS = 1024 if SIMULATOR else WARP

# jit options the simulator's fixed-signature `cuda.jit` rejects.
_SIMULATOR_REJECTS = ("lineinfo", "lto", "launch_bounds", "max_registers", "forceinline")


def jit(func=None, **options):
    """`cuda.jit` that drops the options the simulator does not accept."""
    if SIMULATOR:
        options = {k: v for k, v in options.items() if k not in _SIMULATOR_REJECTS}
    if func is None:
        return cuda.jit(**options)
    return cuda.jit(**options)(func)


def device_function(func):
    """An inlined device helper."""
    return jit(func, device=True, inline=True)


# ----------------------------------------------------------------------------------------------------------------
# bf16 <-> f32 on int16 bits. Widening is exact; narrowing rounds to nearest even, NaN stays NaN.
if SIMULATOR:

    @device_function
    def bf16_to_f32(u):
        bits = np.array([int(u) & 0xFFFF], dtype=np.uint32) << np.uint32(16)
        return bits.view(np.float32)[0]

    @device_function
    def f32_to_bf16(f):
        b = int(np.array([f], dtype=np.float32).view(np.uint32)[0])
        if (b & 0x7FFFFFFF) > 0x7F800000:
            return np.int16(0x7FC0)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFFFFFF
        return np.array([b >> 16], dtype=np.uint32).astype(np.uint16).view(np.int16)[0]

    @device_function
    def block_sum(value, scratch):
        """Sum of `value` over the block (every thread gets it). Tree reduction through shared memory."""
        tid = cuda.threadIdx.x
        n = cuda.blockDim.x
        scratch[tid] = value
        cuda.syncthreads()
        step = 1
        while step < n:
            if tid % (2 * step) == 0 and tid + step < n:
                scratch[tid] += scratch[tid + step]
            cuda.syncthreads()
            step *= 2
        total = scratch[0]
        cuda.syncthreads()
        return total

    @device_function
    def block_max(value, scratch):
        tid = cuda.threadIdx.x
        n = cuda.blockDim.x
        scratch[tid] = value
        cuda.syncthreads()
        step = 1
        while step < n:
            if tid % (2 * step) == 0 and tid + step < n:
                scratch[tid] = max(scratch[tid], scratch[tid + step])
            cuda.syncthreads()
            step *= 2
        total = scratch[0]
        cuda.syncthreads()
        return total

    @device_function
    def row_sum(value, scratch):
        """Sum of `value` over threadIdx.x, for each threadIdx.y apart (see the GPU version for the contract)."""
        tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        scratch[tid] = value
        cuda.syncthreads()
        first = tid - cuda.threadIdx.x
        total = float32(0.0)
        for i in range(cuda.blockDim.x):
            total += scratch[first + i]
        return total

    @device_function
    def lane_group_sum(value, width, scratch):
        """Sum of `value` over aligned groups of `width` lanes (a power of two <= 32); every lane of a group gets it.
        The simulator has no shuffles: this goes through shared memory (`scratch`, REDUCE_SLOTS fp32) with block
        barriers, so every thread of the block must call it equally often (kernels idle lanes around it, never skip
        it). blockDim.x must be a multiple of `width`."""
        tid = cuda.threadIdx.x
        scratch[tid] = value
        cuda.syncthreads()
        first = tid - tid % width
        total = float32(0.0)
        for i in range(width):
            total += scratch[first + i]
        cuda.syncthreads()
        return total

else:
    from numba.cuda import libdevice

    @device_function
    def bf16_to_f32(u):
        return libdevice.int_as_float(int32(u) << 16)

    @device_function
    def f32_to_bf16(f):
        b = uint32(libdevice.float_as_int(f))
        if (b & uint32(0x7FFFFFFF)) > uint32(0x7F800000):
            return int16(0x7FC0)
        b += uint32(0x7FFF) + ((b >> uint32(16)) & uint32(1))
        return int16(b >> uint32(16))

    @device_function
    def _warp_sum(v):
        offset = 16
        while offset > 0:
            v += cuda.shfl_down_sync(0xFFFFFFFF, v, offset)
            offset //= 2
        return v

    @device_function
    def _warp_max(v):
        offset = 16
        while offset > 0:
            v = max(v, cuda.shfl_down_sync(0xFFFFFFFF, v, offset))
            offset //= 2
        return v

    @device_function
    def lane_group_sum(value, width, scratch):
        """Sum of `value` over aligned groups of `width` lanes (a power of two <= 32); every lane of a group gets it.
        All 32 lanes of the warp must call it. An xor butterfly: every lane of a group ends with the same bits (fp
        addition is commutative). `scratch` is only used by the simulator's version."""
        offset = width // 2
        while offset > 0:
            value += cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)
            offset //= 2
        return value

    @device_function
    def block_sum(value, scratch):
        """Sum of `value` over the block (every thread gets it). blockDim.x must be a multiple of 32."""
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        value = _warp_sum(value)
        if lane == 0:
            scratch[warp] = value
        cuda.syncthreads()
        n_warps = cuda.blockDim.x // WARP
        value = scratch[lane] if lane < n_warps else float32(0.0)
        value = _warp_sum(value)
        cuda.syncthreads()  # everyone has read scratch before it is reused
        return cuda.shfl_sync(0xFFFFFFFF, value, 0)

    @device_function
    def row_sum(value, scratch):
        """Sum of `value` over threadIdx.x, for each threadIdx.y apart (a 2-D block whose rows of blockDim.x threads,
        a multiple of 32, work on different data); every thread of a row gets its row's sum. Every thread of the
        block must call it (a block barrier). It ends without a second barrier: `scratch` (REDUCE_SLOTS fp32) must
        not be written again before every thread has read it, so a caller in a loop alternates two scratch buffers
        (the barrier of the next call then orders the reuse)."""
        lane = cuda.threadIdx.x % WARP
        row_warps = cuda.blockDim.x // WARP
        first = cuda.threadIdx.y * row_warps
        value = _warp_sum(value)
        if lane == 0:
            scratch[first + cuda.threadIdx.x // WARP] = value
        cuda.syncthreads()
        value = scratch[first + lane] if lane < row_warps else float32(0.0)
        value = _warp_sum(value)
        return cuda.shfl_sync(0xFFFFFFFF, value, 0)

    @device_function
    def block_max(value, scratch):
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        value = _warp_max(value)
        if lane == 0:
            scratch[warp] = value
        cuda.syncthreads()
        n_warps = cuda.blockDim.x // WARP
        value = scratch[lane] if lane < n_warps else float32(-math.inf)
        value = _warp_max(value)
        cuda.syncthreads()
        return cuda.shfl_sync(0xFFFFFFFF, value, 0)


@device_function
def f32_to_f32(f):
    return float32(f)


# The element types kernels accept, as (numba type name in signatures, load, store).
# Kernels are written once against `load`/`store` and built per dtype by a factory.
ELEMENT_TYPES = {
    torch.float32: ("float32", f32_to_f32, f32_to_f32),
    torch.bfloat16: ("int16", bf16_to_f32, f32_to_bf16),
}


def element_type(dtype: torch.dtype) -> str:
    try:
        return ELEMENT_TYPES[dtype][0]
    except KeyError:
        raise TypeError(f"surogate.kernels supports float32 and bfloat16 tensors, got {dtype}") from None


def as_kernel_arg(t: torch.Tensor):
    """The tensor as a Numba kernel sees it: bf16 as int16 bits, no autograd (DLPack refuses requires_grad)."""
    t = t.detach()
    t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return t.numpy() if SIMULATOR else t  # the simulator writes numpy scalars, which torch CPU tensors refuse


# ----------------------------------------------------------------------------------------------------------------
# Streams and devices.
_streams: dict[int, object] = {}
_selected_device: list[int] = []


def _launch_stream(t: torch.Tensor | None):
    if SIMULATOR:
        return 0
    index = t.device.index if t is not None and t.device.index is not None else torch.cuda.current_device()
    if not _selected_device or _selected_device[0] != index:  # numba's context must be on torch's device
        cuda.select_device(index)
        _selected_device[:] = [index]
    ptr = torch.cuda.current_stream(index).cuda_stream
    stream = _streams.get(ptr)
    if stream is None:
        stream = _streams[ptr] = cuda.external_stream(ptr)
    return stream


class Kernel:
    """One Numba kernel for one explicit signature, compiled on first launch (never at import).

    `kernel.launch(grid, block, args)` launches on torch's current stream of the first tensor argument's device;
    tensor arguments are passed through `as_kernel_arg` (bf16 as int16 bits).
    `kernel.ptx()` compiles the same signature for sm_90 without a GPU (CI's compile check).
    """

    registry: list[Kernel] = []

    def __init__(self, pyfunc, signature: str, name: str, **options):
        self.pyfunc = pyfunc
        self.signature = signature
        self.name = name
        self.options = dict(options)
        self._dispatcher = None
        Kernel.registry.append(self)

    def compiled(self):
        if self._dispatcher is None:
            if SIMULATOR:
                self._dispatcher = jit(self.pyfunc, **self.options)
            else:
                self._dispatcher = cuda.jit(self.signature, **self.options)(self.pyfunc)
        return self._dispatcher

    def launch(self, grid, block, args, shared_bytes: int = 0):
        stream = _launch_stream(next((a for a in args if isinstance(a, torch.Tensor)), None))
        args = [as_kernel_arg(a) if isinstance(a, torch.Tensor) else a for a in args]
        self.compiled()[grid, block, stream, shared_bytes](*args)

    def ptx(self, cc=(9, 0)) -> str:
        ptx, _ = cuda.compile_ptx(self.pyfunc, self.signature, cc=cc, **self.options)
        return ptx

    def __repr__(self):
        return f"Kernel({self.name}: {self.signature})"


def kernels_per_dtype(make, signature: str, name: str, **options) -> dict[torch.dtype, Kernel]:
    """Build `make(load, store)` once per element type. `{t}` in `signature` becomes that type's numba name."""
    return {
        dtype: Kernel(make(load, store), signature.format(t=numba_type), f"{name}[{numba_type}]", **options)
        for dtype, (numba_type, load, store) in ELEMENT_TYPES.items()
    }


def dispatch(kernel_path, reference_path):
    """A public op: the Numba kernel for CUDA tensors, the torch reference for anything else."""

    def op(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        return (kernel_path if first.is_cuda else reference_path)(*args, **kwargs)

    op.__name__ = getattr(kernel_path, "__name__", "op")
    op.__doc__ = kernel_path.__doc__
    return op


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def sm_count(device: torch.device | None = None) -> int:
    if SIMULATOR or not torch.cuda.is_available():
        return 2
    return torch.cuda.get_device_properties(device or torch.cuda.current_device()).multi_processor_count
