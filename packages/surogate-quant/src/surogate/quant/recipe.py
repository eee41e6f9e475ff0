"""Recipes: how a linear layer's three GEMMs run. Models call `recipe.forward / dgrad / wgrad` (or `backward`) with a
per-layer context from `recipe.linear(name, layer)`; they never branch on formats themselves.

GEMMs of a linear layer with x [M, K] (tokens flattened), W [N, K], dy [M, N]:
  forward y = x W^T [M, N];   dgrad dx = dy W [M, K];   wgrad dW = dy^T x [N, K].
- "bf16": torch.matmul in BF16 (fp32 accumulation in cuBLAS).
- "fp8-hybrid" (TransformerEngine's DelayedScaling): forward E4M3 x E4M3; dgrad E5M2(dy) x E4M3(W); wgrad
  E5M2(dy)^T x E4M3(x). Activations (the forward input x) use delayed scaling (amax history, default 1024, margin,
  recorded by the fused encode; `after_optimizer_step()` rolls it). Gradients dy: delayed scaling too by default
  (grad_scaling="delayed", TE's behaviour: one pass writes both layouts of dy and records its amax), or
  grad_scaling="current": a just-in-time scale from a separate abs-max pass (the
  reference Surogate's choice, one more read of dy). Weights: just-in-time per-tensor scale, quantised once per
  optimizer step into a cache holding both layouts (forward W, dgrad W^T): a frozen weight (LoRA base) is
  quantised once, a trainable nn.Parameter again by `after_optimizer_step()` in place (so CUDA graphs that read
  the cache stay valid); any weight whose storage or version counter changed is re-quantised when next used.
  The cache costs 2 bytes per weight of the quantised layers (cache_weights=False: quantise per GEMM, as
  before); QLoRA base weights are never cached (their memory is the point of QLoRA). wgrad reuses the forward
  scale of x (quantise + transpose). Per GEMM only the activation / gradient encode runs next to the FP8 GEMM,
  and the inverse scales are kept, not recomputed. Forward GEMMs use cuBLASLt's fast accumulation (TE's fprop
  default), dgrad / wgrad the split (fp32-promoted) accumulator. CUDA with SM >= 8.9 and dims that are multiples of 16:
  torch._scaled_mm (cuBLASLt FP8). Elsewhere (CPU, older GPUs, odd shapes): the exact emulation, fp32 matmul of
  the FP8 values times both inverse scales, as cuBLASLt computes it.
  Calibration: until the first `after_optimizer_step()` there is no amax history, so x and dy are scaled just in
  time (an abs-max pass each) while their amax is recorded. TE encodes that first step with scale 1 instead,
  which flushes small gradients (E5M2's least value is 2^-16): the dgrad chain then records amaxes far too small
  for the layers below, and the second step saturates their gradients (measured: all gradients 0.73 relative
  error vs bf16 on the Qwen3-0.6B shape at 4096 tokens, 0.22 with calibration). `calibrated` tells the trainer
  when the delayed path is in place, so that CUDA graphs are captured after it.
- "nvfp4" (TransformerEngine's NVFP4BlockScaling): x 1-D blocks RNE, W 16x16 tiles RNE (1-D blocks along the
  reduction dim with fp4_disable_2d_quantization: finer; on the 2-layer quickstart every-layer NVFP4 then ends at
  0.017 instead of stalling at 0.23), dy 1-D blocks with
  stochastic rounding (seeds change each optimizer step), wgrad inputs through the 16-point random Hadamard
  transform along the tokens. No FP4 GEMM runs here (Hopper has no FP4 tensor cores; Blackwell's block-scaled
  GEMMs are not wired yet): operands are quantised exactly, dequantised without the global scales (exact in
  BF16), multiplied in BF16 (fp32 on CPU), and the result scaled by alpha = 1 / (S_a S_b). The numerics of NVFP4,
  not its speed; `describe()` says so for the run log.
Layers named with layer=None (lm_head, embeddings) and the first / last `skip_quant_*_layers` run in BF16.
Weights may be QuantizedWeight (QLoRA): they are dequantised to BF16 for each GEMM (fp8-hybrid and nvfp4 then
quantise that BF16 tensor per their rules).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import fp8, nvfp4
from .qlora import QuantizedWeight

RECIPES = ("bf16", "fp8-hybrid", "nvfp4")
GRAD_SCALING = ("delayed", "current")
_SR_DGRAD = 0x9E3779B9
_SR_WGRAD = _SR_DGRAD + 1
_RHT_SALT = 0x51ED27


@dataclass(eq=False)
class LinearContext:
    """One linear layer's handle: `mode` is what runs for it ("bf16", "fp8" or "nvfp4"); `slot` indexes its
    delayed-scaling state (fp8) or its stochastic-rounding stream (nvfp4)."""

    name: str
    layer: int | None
    mode: str
    slot: int = -1


@dataclass(eq=False)
class _Fp8Weight:
    """A weight's E4M3 codes in both GEMM layouts with its per-tensor scale (forward reads codes [N, K], dgrad
    codes_t [K, N]). `source` is the tensor they were made from; ptr / version tell when it changed."""

    codes: torch.Tensor
    codes_t: torch.Tensor
    scale: torch.Tensor  # [1] fp32
    scale_inv: torch.Tensor  # [1] fp32
    source: torch.Tensor | None = None
    ptr: int = -1
    version: int = -1
    dirty: bool = True
    dtype: torch.dtype | None = None  # what the weight was cast to before quantising

    @classmethod
    def empty(cls, w: torch.Tensor) -> _Fp8Weight:
        n, k = w.shape
        f32 = dict(dtype=torch.float32, device=w.device)
        return cls(torch.empty(n, k, dtype=torch.uint8, device=w.device),
                   torch.empty(k, n, dtype=torch.uint8, device=w.device), torch.ones(1, **f32), torch.ones(1, **f32))

    def fits(self, w: torch.Tensor) -> bool:
        return self.codes.shape == w.shape and self.codes.device == w.device

    def current(self, w: torch.Tensor) -> bool:
        return not self.dirty and self.ptr == w.data_ptr() and self.version == w._version

    @torch.no_grad()
    def refresh(self, w: torch.Tensor, dtype: torch.dtype) -> None:
        """Quantise w (cast to dtype first, as the uncached path does) into the existing buffers."""
        wd = w.detach()
        wd = wd if wd.dtype == dtype else wd.to(dtype)
        self.scale.copy_(fp8.scale_from_amax(fp8.abs_max(wd), "e4m3").reshape(1))
        torch.reciprocal(self.scale, out=self.scale_inv)
        fp8.encode_both(wd, self.scale, "e4m3", out=self.codes, out_t=self.codes_t)
        # a Parameter is the weight's persistent storage: keep it for after_optimizer_step (a later call may pass
        # a saved or gathered alias)
        if isinstance(w, torch.nn.Parameter) or not isinstance(self.source, torch.nn.Parameter):
            self.source = w
        self.ptr, self.version, self.dirty, self.dtype = w.data_ptr(), w._version, False, dtype


class Recipe:
    def __init__(
        self,
        name: str = "bf16",
        *,
        n_layers: int = 0,
        skip_quant_first_layers: int = 0,
        skip_quant_last_layers: int = 0,
        amax_history_len: int = 1024,
        margin: int = 0,
        seed: int = 0,
        gemm: str | None = None,
        grad_scaling: str = "delayed",
        cache_weights: bool = True,
        fp4_disable_2d_quantization: bool = False,
    ):
        """gemm: None picks per call; "scaled_mm" or "emulate" force the FP8 GEMM path (tests use both on CPU).
        grad_scaling: "delayed" or "current" for the E5M2 gradients; cache_weights: keep FP8 weights between
        GEMMs (fp8-hybrid; see the module doc). fp4_disable_2d_quantization (nvfp4, the reference's key): weights in
        1-D blocks of 16 along the GEMM's reduction dim (forward W along K, dgrad W^T along N) instead of 16x16 tiles
        (finer scales; W and W^T then quantise differently)."""
        if name not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}")
        if min(skip_quant_first_layers, skip_quant_last_layers, n_layers, amax_history_len - 1) < 0:
            raise ValueError("n_layers and skip_quant_*_layers must be >= 0, amax_history_len >= 1")
        if gemm not in (None, "scaled_mm", "emulate"):
            raise ValueError(f"gemm must be None, 'scaled_mm' or 'emulate', got {gemm!r}")
        if grad_scaling not in GRAD_SCALING:
            raise ValueError(f"grad_scaling must be 'delayed' or 'current', got {grad_scaling!r}")
        self.name = name
        self.n_layers = n_layers
        self.skip_first = skip_quant_first_layers
        self.skip_last = skip_quant_last_layers
        self.amax_history_len = amax_history_len
        self.margin = margin
        self.seed = seed
        self.gemm = gemm
        self.grad_scaling = grad_scaling
        self.cache_weights = cache_weights
        self.weight_2d = not fp4_disable_2d_quantization
        self.contexts: list[LinearContext] = []
        self._n_fp8 = 0  # contexts in mode "fp8": the delayed-scaling slots
        self._scaling: fp8.DelayedScaling | None = None  # forward inputs x, E4M3
        self._grad_scaling: fp8.DelayedScaling | None = None  # gradients dy, E5M2 (grad_scaling "delayed")
        self._weights: dict[int, _Fp8Weight] = {}  # fp8 slot -> cached weight codes
        self._step_seed: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- registration
    def linear(self, name: str, layer: int | None = None) -> LinearContext:
        """The context of one linear layer. layer=None (lm_head, embeddings) or a skipped layer runs in BF16."""
        quantized = (
            self.name != "bf16" and layer is not None and self.skip_first <= layer < self.n_layers - self.skip_last
        )
        mode = {"fp8-hybrid": "fp8", "nvfp4": "nvfp4"}[self.name] if quantized else "bf16"
        slot = sum(c.mode == mode for c in self.contexts) if quantized else -1
        self._n_fp8 += mode == "fp8"
        ctx = LinearContext(name, layer, mode, slot)
        self.contexts.append(ctx)
        return ctx

    def _delayed_scaling(self, device, n_min: int = 0, grad: bool = False) -> fp8.DelayedScaling:
        """The delayed-scaling state of the forward inputs (E4M3), or with grad=True of the gradients (E5M2)."""
        ds = self._grad_scaling if grad else self._scaling
        n = max(n_min, self._n_fp8)
        if ds is None or ds.scale.numel() < n or ds.scale.device != torch.device(device):
            fmt = "e5m2" if grad else "e4m3"
            fresh = fp8.DelayedScaling(n, fmt, self.amax_history_len, self.margin, device=device)
            if ds is not None:  # layers registered late keep what the earlier ones learned
                k, fresh.updates = ds.scale.numel(), ds.updates
                for name, t in ds.state_dict().items():
                    getattr(fresh, name)[..., :k].copy_(t)
            ds = fresh
            if grad:
                self._grad_scaling = ds
            else:
                self._scaling = ds
        return ds

    @property
    def calibrated(self) -> bool:
        """False while fp8 layers still scale x or dy just in time (before the first after_optimizer_step)."""
        if self._n_fp8 == 0:
            return True
        scalings = [self._scaling] + ([self._grad_scaling] if self.grad_scaling == "delayed" else [])
        return all(ds is not None and ds.updates > 0 for ds in scalings)

    def _x_scales(self, x2, ctx: LinearContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, inverse scale) of a forward input: the delayed ones, or just in time before calibration."""
        ds = self._delayed_scaling(x2.device)
        if ds.updates == 0:
            scale = fp8.scale_from_amax(fp8.abs_max(x2), "e4m3", self.margin)
            return scale, torch.reciprocal(scale)
        return ds.scale_slot(ctx.slot), ds.scale_inv_slot(ctx.slot)

    def _fp8_weight(self, w, ctx: LinearContext, dtype, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(E4M3 codes of W [N, K], or of W^T [K, N] when transposed; the inverse scale): from the cache when it is
        current, else quantised into it. Uncached (QLoRA weights, cache_weights=False): quantised for this GEMM
        alone, in the one layout it needs."""
        if isinstance(w, QuantizedWeight) or not self.cache_weights:
            plain = _plain(w, dtype)
            scale = fp8.scale_from_amax(fp8.abs_max(plain), "e4m3")
            codes = (fp8.encode_transpose if transposed else fp8.encode)(plain, scale, "e4m3")
            return codes, torch.reciprocal(scale)
        entry = self._cached_weight(w, ctx, dtype)
        return (entry.codes_t if transposed else entry.codes), entry.scale_inv

    def _cached_weight(self, w, ctx: LinearContext, dtype) -> _Fp8Weight:
        entry = self._weights.get(ctx.slot)
        if entry is None or not entry.fits(w):
            entry = self._weights[ctx.slot] = _Fp8Weight.empty(w)
        if not entry.current(w) or entry.dtype != dtype:
            entry.refresh(w, dtype)
        return entry

    def _seed(self, ctx: LinearContext, salt: int, device) -> torch.Tensor:
        if self._step_seed is None or self._step_seed.device != torch.device(device):
            self._step_seed = torch.tensor([self.seed], dtype=torch.int64, device=device)
        return (self._step_seed * 1000003 + (ctx.slot * 7919 + salt)) & 0xFFFFFFFF

    @torch.no_grad()
    def after_optimizer_step(self):
        """Roll the FP8 amax histories and update the scales; re-quantise the cached trainable weights in place;
        advance the stochastic-rounding seeds (device ops only)."""
        for ds in (self._scaling, self._grad_scaling):
            if ds is not None:
                ds.update()
        for entry in self._weights.values():
            w = entry.source
            if w is None:
                continue
            if not isinstance(w, torch.nn.Parameter):
                # an alias (a ZeRO-3 gathered copy): it may hold other data now, re-quantise at its next use
                # (eager only: under CUDA graphs the weights must be the model's nn.Parameters, as in CausalLM)
                entry.dirty = True
            elif w.requires_grad or w._version != entry.version:
                entry.refresh(w, entry.dtype)  # in place: graphs replayed after this read the new codes
        if self._step_seed is not None:
            self._step_seed.add_(1)

    def state_dict(self) -> dict:
        state = {"seed_step": self._step_seed}
        if self._scaling is not None:
            state.update(self._scaling.state_dict())
        if self._grad_scaling is not None:
            state.update({f"grad_{k}": v for k, v in self._grad_scaling.state_dict().items()})
        return state

    def load_state_dict(self, state: dict):
        if state.get("seed_step") is not None:
            self._step_seed = state["seed_step"].clone()
        if "scale" in state:
            self._delayed_scaling(state["scale"].device, n_min=state["scale"].numel()).load_state_dict(state)
        if "grad_scale" in state:
            grad = {k[len("grad_"):]: v for k, v in state.items() if k.startswith("grad_")}
            self._delayed_scaling(grad["scale"].device, n_min=grad["scale"].numel(), grad=True).load_state_dict(grad)

    # ------------------------------------------------------------------------------------------------ GEMMs
    def forward(self, x: torch.Tensor, w, ctx: LinearContext) -> torch.Tensor:
        """y = x W^T: x [..., K], W [N, K] (tensor or QuantizedWeight) -> [..., N] in x's dtype."""
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.mode == "fp8":
            sx, sx_inv = self._x_scales(x2, ctx)
            xq = fp8.encode(x2, sx, "e4m3", amax_out=self._delayed_scaling(x.device).amax_slot(ctx.slot))
            wq, w_inv = self._fp8_weight(w, ctx, x.dtype, transposed=False)
            y = self._fp8_gemm(xq, "e4m3", sx_inv, wq, "e4m3", w_inv, x.dtype, fast_accum=True)
            return y.view(*x.shape[:-1], wq.shape[0])
        w = _plain(w, x.dtype)
        if ctx.mode == "nvfp4":
            y = _fp4_gemm(nvfp4.quantize(x2), nvfp4.quantize(w, block_2d=self.weight_2d), x.dtype)
        else:
            y = torch.matmul(x2, w.t())
        return y.view(*x.shape[:-1], w.shape[0])

    def dgrad(self, dy: torch.Tensor, w, ctx: LinearContext) -> torch.Tensor:
        """dx = dy W: dy [..., N] -> [..., K] in dy's dtype."""
        return self.backward(dy, None, w, ctx, need_dw=False)[0]

    def wgrad(self, dy: torch.Tensor, x: torch.Tensor, ctx: LinearContext, out_dtype=None) -> torch.Tensor:
        """dW = dy^T x: [N, K] in out_dtype (default dy's dtype)."""
        return self.backward(dy, x, None, ctx, need_dx=False, out_dtype=out_dtype)[1]

    def backward(self, dy, x, w, ctx: LinearContext, need_dx=True, need_dw=True, out_dtype=None):
        """(dx or None, dW or None), sharing the quantisation of dy between the two GEMMs."""
        dy2 = dy.reshape(-1, dy.shape[-1])
        out_dtype = out_dtype or dy.dtype
        dx = dw = None
        if ctx.mode == "fp8":
            gs = self._delayed_scaling(dy.device, grad=True) if self.grad_scaling == "delayed" else None
            amax_out = None if gs is None else gs.amax_slot(ctx.slot)  # this dy's amax, recorded by the encode
            if gs is not None and gs.updates > 0:  # the scale of earlier steps
                sdy, sdy_inv = gs.scale_slot(ctx.slot), gs.scale_inv_slot(ctx.slot)
            else:  # just in time: grad_scaling "current", or not calibrated yet
                sdy = fp8.scale_from_amax(fp8.abs_max(dy2), "e5m2", self.margin)
                sdy_inv = torch.reciprocal(sdy)
            dyq = dyq_t = None
            if need_dx and need_dw:
                dyq, dyq_t = fp8.encode_both(dy2.contiguous(), sdy, "e5m2", amax_out)
            elif need_dx:
                dyq = fp8.encode(dy2, sdy, "e5m2", amax_out)
            elif need_dw:
                dyq_t = fp8.encode_transpose(dy2, sdy, "e5m2", amax_out)
            if need_dx:
                wq_t, w_inv = self._fp8_weight(w, ctx, dy.dtype, transposed=True)
                dx = self._fp8_gemm(dyq, "e5m2", sdy_inv, wq_t, "e4m3", w_inv, dy.dtype)
            if need_dw:
                x2 = x.reshape(-1, x.shape[-1])
                sx, sx_inv = self._x_scales(x2, ctx)  # the forward's scale (updated only after the step)
                xq_t = fp8.encode_transpose(x2, sx, "e4m3")
                dw = self._fp8_gemm(dyq_t, "e5m2", sdy_inv, xq_t, "e4m3", sx_inv, out_dtype)
        elif ctx.mode == "nvfp4":
            if need_dx:
                w = _plain(w, dy.dtype)
                dyq = nvfp4.quantize(dy2, stochastic=True, seed=self._seed(ctx, _SR_DGRAD, dy.device))
                # 2-D: the forward's tiles, transposed; 1-D: blocks along N, not the forward's
                wq_t = nvfp4.quantize(w.t().contiguous(), block_2d=self.weight_2d)
                dx = _fp4_gemm(dyq, wq_t, dy.dtype)
            if need_dw:
                dw = self._nvfp4_wgrad(dy2, x.reshape(-1, x.shape[-1]), ctx, out_dtype)
        else:
            if need_dx:
                dx = torch.matmul(dy2, _plain(w, dy.dtype))
            if need_dw:
                dw = torch.matmul(dy2.t(), x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(out_dtype)
        if dx is not None:
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        return dx, dw

    def _nvfp4_wgrad(self, dy2, x2, ctx, out_dtype):
        m = dy2.shape[0]
        pad = -m % nvfp4.BLOCK  # zero rows change no product, and the Hadamard groups need 16
        if pad:
            dy2 = torch.nn.functional.pad(dy2, (0, 0, 0, pad))
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
        rht_seed = (self.seed ^ _RHT_SALT) + ctx.slot
        dy_t = nvfp4.hadamard16(dy2.contiguous(), rht_seed).t().contiguous()
        x_t = nvfp4.hadamard16(x2.contiguous(), rht_seed).t().contiguous()
        dyq = nvfp4.quantize(dy_t, stochastic=True, seed=self._seed(ctx, _SR_WGRAD, dy2.device))
        return _fp4_gemm(dyq, nvfp4.quantize(x_t), out_dtype)

    def _fp8_gemm(self, a, a_fmt, a_scale_inv, b_t, b_fmt, b_scale_inv, out_dtype, fast_accum=False):
        """(a * a_scale_inv) @ (b_t * b_scale_inv)^T for FP8 codes a [M, K] and b_t [N, K] (row-major).
        fast_accum (forward only, as TransformerEngine: no split accumulator for fprop, split for dgrad / wgrad):
        cuBLASLt keeps the sums in the tensor cores' accumulator instead of promoting them to fp32 every few
        K-steps; the emulation always sums in fp32."""
        a_inv = a_scale_inv.reshape(())
        b_inv = b_scale_inv.reshape(())
        if self._use_scaled_mm(a, b_t):
            a_inv, b_inv = _aligned(a_inv), _aligned(b_inv)
            a8 = a.view(fp8.FORMATS[a_fmt].torch_dtype)
            b8 = b_t.view(fp8.FORMATS[b_fmt].torch_dtype)
            try:
                return torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype,
                                        use_fast_accum=fast_accum)
            except RuntimeError as e:
                # cuBLASLt refusing a layout is a host-side status (the CUDA context stays usable). Outside a
                # graph capture (the trainer always runs a step eagerly first), say so once and emulate from now
                # on: correct numbers, slower GEMMs. Inside a capture, or any other error: raise.
                capturing = a.is_cuda and torch.cuda.is_current_stream_capturing()
                if "CUBLAS_STATUS_NOT_SUPPORTED" not in str(e) or capturing:
                    raise
                warnings.warn(f"fp8-hybrid: cuBLASLt refused an FP8 GEMM ({list(a.shape)} x {list(b_t.shape)}^T, "
                              f"{a_fmt} x {b_fmt}): {str(e)[:160]}. Falling back to the exact emulation (fp32 "
                              "matmul of the FP8 values) for this run: correct, but slower than BF16.", stacklevel=2)
                self.gemm = "emulate"
        av = fp8.decode(a, 1.0, a_fmt, torch.float32)
        bv = fp8.decode(b_t, 1.0, b_fmt, torch.float32)
        return (torch.matmul(av, bv.t()) * (a_inv * b_inv)).to(out_dtype)

    def _use_scaled_mm(self, a, b_t) -> bool:
        if self.gemm is not None:
            return self.gemm == "scaled_mm"
        if not a.is_cuda or torch.cuda.get_device_capability(a.device) < (8, 9):
            return False
        return a.shape[0] % 16 == 0 and a.shape[1] % 16 == 0 and b_t.shape[0] % 16 == 0

    # ---------------------------------------------------------------------------------------------- autograd
    def linear_autograd(self, x: torch.Tensor, w, ctx: LinearContext) -> torch.Tensor:
        """forward with autograd: dx by dgrad, dW by wgrad when W is a tensor that requires grad."""
        if isinstance(w, QuantizedWeight):
            return _RecipeLinear.apply(x, None, w, self, ctx)
        return _RecipeLinear.apply(x, w, None, self, ctx)

    # ---------------------------------------------------------------------------------------------- describe
    def describe(self, device=None) -> str:
        """One paragraph for the start of a run: what runs where."""
        device = (
            torch.device(device)
            if device is not None
            else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        )
        where = "CPU"
        cc = None
        if device.type == "cuda":
            cc = torch.cuda.get_device_capability(device)
            where = f"{torch.cuda.get_device_name(device)} (sm_{cc[0]}{cc[1]})"
        n_quant = sum(c.mode != "bf16" for c in self.contexts)
        skip = (
            f"; first {self.skip_first} / last {self.skip_last} layers in BF16"
            if self.skip_first or self.skip_last
            else ""
        )
        layers = f"{n_quant} of {len(self.contexts)} linear layers quantised" if self.contexts else "no layers yet"
        if self.name == "bf16":
            return f"recipe bf16: every GEMM in BF16 with fp32 accumulation on {where}."
        if self.name == "fp8-hybrid":
            if self.gemm == "scaled_mm" or (self.gemm is None and cc is not None and cc >= (8, 9)):
                gemm = "torch._scaled_mm (cuBLASLt FP8 tensor cores; dims not multiples of 16 fall back to emulation)"
            else:
                gemm = "exact emulation (fp32 matmul of the FP8 values times the inverse scales)"
            delayed, jit = ("activations and gradients", "weights") if self.grad_scaling == "delayed" else (
                "activations", "weights and gradients")
            cache = ("; weights quantised once per optimizer step and cached in both GEMM layouts (+2 bytes per "
                     "quantised weight; QLoRA bases excepted)") if self.cache_weights else ""
            return (
                f"recipe fp8-hybrid on {where}: forward E4M3 x E4M3, dgrad/wgrad E5M2 gradients x E4M3; "
                f"delayed scaling for {delayed} (amax history {self.amax_history_len}, margin {self.margin}), "
                f"just-in-time per-tensor scales for {jit}{cache}; GEMMs: {gemm}; lm_head and embeddings in "
                f"BF16{skip}; {layers}."
            )
        return (
            f"recipe nvfp4 on {where}: E2M1 values, 16-value blocks with E4M3 scales and an FP32 global scale "
            f"({'16x16 tiles' if self.weight_2d else '1-D blocks'} for weights), stochastic rounding for gradients, "
            f"16-point random Hadamard on the wgrad inputs. No FP4 GEMM runs here (Hopper and older have no FP4 "
            f"tensor cores; Blackwell's are not wired): "
            f"operands are quantised exactly and the GEMMs run in {'BF16' if cc else 'fp32'} on the dequantised "
            f"values - NVFP4 accuracy, not NVFP4 speed; lm_head and embeddings in BF16{skip}; {layers}."
        )


def _plain(w, dtype) -> torch.Tensor:
    if isinstance(w, QuantizedWeight):
        return w.dequantize(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    return w.to(dtype) if w.dtype != dtype else w


def _aligned(scale: torch.Tensor) -> torch.Tensor:
    """A scale for torch._scaled_mm at a 16-byte aligned address. The delayed-scaling slots are views into one fp32
    vector (slot i sits 4 i bytes in), and cuBLASLt refuses an FP8 GEMM whose scale pointer is not 16-byte aligned
    (CUBLAS_STATUS_NOT_SUPPORTED, seen on the H100 at the second slot). The address is fixed for a given slot, so
    the choice is the same in every replay of a captured graph; the copy is one 4-byte kernel."""
    return scale if scale.data_ptr() % 16 == 0 else scale.clone()


def _fp4_gemm(a: nvfp4.NVFP4Tensor, b_t: nvfp4.NVFP4Tensor, out_dtype) -> torch.Tensor:
    """dequant(a) @ dequant(b_t)^T, the global scales applied once to the fp32 result (as FP4 GEMMs do)."""
    compute = torch.bfloat16 if a.codes.is_cuda else torch.float32  # values * block scales are exact in bf16
    av = nvfp4.dequantize(a, compute, include_global=False).reshape(-1, a.shape[-1])
    bv = nvfp4.dequantize(b_t, compute, include_global=False).reshape(-1, b_t.shape[-1])
    alpha = torch.reciprocal(a.global_scale * b_t.global_scale)
    return (torch.matmul(av, bv.t()).float() * alpha).to(out_dtype)


class _RecipeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, qweight, recipe, lctx):
        weight = w if w is not None else qweight
        ctx.recipe, ctx.lctx, ctx.qweight = recipe, lctx, qweight
        ctx.save_for_backward(x, w)
        return recipe.forward(x, weight, lctx)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        weight = w if w is not None else ctx.qweight
        need_dw = w is not None and ctx.needs_input_grad[1]
        dx, dw = ctx.recipe.backward(
            dy.contiguous(),
            x,
            weight,
            ctx.lctx,
            need_dx=ctx.needs_input_grad[0],
            need_dw=need_dw,
            out_dtype=None if w is None else w.dtype,
        )
        return dx, dw, None, None, None
