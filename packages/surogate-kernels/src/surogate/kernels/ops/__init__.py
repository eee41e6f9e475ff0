"""One op per module: Numba kernels, launchers (`forward` / `backward`) and the torch reference."""
