"""Recipes: how a linear layer's three GEMMs run. Models call `recipe.forward / dgrad / wgrad` (or `backward`) with a
per-layer context from `recipe.linear(name, layer)`; they never branch on formats themselves.

GEMMs of a linear layer with x [M, K] (tokens flattened), W [N, K], dy [M, N]:
  forward y = x W^T [M, N];   dgrad dx = dy W [M, K];   wgrad dW = dy^T x [N, K].
- "bf16": torch.matmul in BF16 (fp32 accumulation in cuBLAS).
- "fp8-hybrid" (TransformerEngine's DelayedScaling): forward E4M3 x E4M3; dgrad E5M2(dy) x E4M3(W); wgrad
  E5M2(dy)^T x E4M3(x). Activations (the forward input x) use delayed scaling (amax history, default 1024, margin,
  recorded by the fused encode; `after_optimizer_step()` rolls it); weights and gradients get just-in-time
  per-tensor scales. wgrad reuses the forward scale of x (quantise + transpose). CUDA with SM >= 8.9 and dims that
  are multiples of 16: torch._scaled_mm (cuBLASLt FP8). Elsewhere (CPU, older GPUs, odd shapes): the exact
  emulation, fp32 matmul of the FP8 values times both inverse scales, as cuBLASLt computes it.
- "nvfp4" (TransformerEngine's NVFP4BlockScaling): x 1-D blocks RNE, W 16x16 tiles RNE, dy 1-D blocks with
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

from dataclasses import dataclass

import torch

from . import fp8, nvfp4
from .qlora import QuantizedWeight

RECIPES = ("bf16", "fp8-hybrid", "nvfp4")
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
    ):
        """gemm: None picks per call; "scaled_mm" or "emulate" force the FP8 GEMM path (tests use both on CPU)."""
        if name not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}")
        if min(skip_quant_first_layers, skip_quant_last_layers, n_layers, amax_history_len - 1) < 0:
            raise ValueError("n_layers and skip_quant_*_layers must be >= 0, amax_history_len >= 1")
        if gemm not in (None, "scaled_mm", "emulate"):
            raise ValueError(f"gemm must be None, 'scaled_mm' or 'emulate', got {gemm!r}")
        self.name = name
        self.n_layers = n_layers
        self.skip_first = skip_quant_first_layers
        self.skip_last = skip_quant_last_layers
        self.amax_history_len = amax_history_len
        self.margin = margin
        self.seed = seed
        self.gemm = gemm
        self.contexts: list[LinearContext] = []
        self._scaling: fp8.DelayedScaling | None = None
        self._step_seed: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- registration
    def linear(self, name: str, layer: int | None = None) -> LinearContext:
        """The context of one linear layer. layer=None (lm_head, embeddings) or a skipped layer runs in BF16."""
        quantized = (
            self.name != "bf16" and layer is not None and self.skip_first <= layer < self.n_layers - self.skip_last
        )
        mode = {"fp8-hybrid": "fp8", "nvfp4": "nvfp4"}[self.name] if quantized else "bf16"
        slot = sum(c.mode == mode for c in self.contexts) if quantized else -1
        ctx = LinearContext(name, layer, mode, slot)
        self.contexts.append(ctx)
        return ctx

    def _delayed_scaling(self, device, n_min: int = 0) -> fp8.DelayedScaling:
        n = max(n_min, sum(c.mode == "fp8" for c in self.contexts))
        ds = self._scaling
        if ds is None or ds.scale.numel() < n or ds.scale.device != torch.device(device):
            fresh = fp8.DelayedScaling(n, "e4m3", self.amax_history_len, self.margin, device=device)
            if ds is not None:  # layers registered late keep what the earlier ones learned
                k = ds.scale.numel()
                for name, t in ds.state_dict().items():
                    getattr(fresh, name)[..., :k].copy_(t)
            self._scaling = ds = fresh
        return ds

    def _seed(self, ctx: LinearContext, salt: int, device) -> torch.Tensor:
        if self._step_seed is None or self._step_seed.device != torch.device(device):
            self._step_seed = torch.tensor([self.seed], dtype=torch.int64, device=device)
        return (self._step_seed * 1000003 + (ctx.slot * 7919 + salt)) & 0xFFFFFFFF

    @torch.no_grad()
    def after_optimizer_step(self):
        """Roll the FP8 amax history and update the scales; advance the stochastic-rounding seeds (device ops)."""
        if self._scaling is not None:
            self._scaling.update()
        if self._step_seed is not None:
            self._step_seed.add_(1)

    def state_dict(self) -> dict:
        state = {"seed_step": self._step_seed}
        if self._scaling is not None:
            state.update(self._scaling.state_dict())
        return state

    def load_state_dict(self, state: dict):
        if state.get("seed_step") is not None:
            self._step_seed = state["seed_step"].clone()
        if "scale" in state:
            self._delayed_scaling(state["scale"].device, n_min=state["scale"].numel()).load_state_dict(state)

    # ------------------------------------------------------------------------------------------------ GEMMs
    def forward(self, x: torch.Tensor, w, ctx: LinearContext) -> torch.Tensor:
        """y = x W^T: x [..., K], W [N, K] (tensor or QuantizedWeight) -> [..., N] in x's dtype."""
        x2 = x.reshape(-1, x.shape[-1])
        w = _plain(w, x.dtype)
        if ctx.mode == "fp8":
            ds = self._delayed_scaling(x.device)
            sx = ds.scale_slot(ctx.slot)
            xq = fp8.encode(x2, sx, "e4m3", amax_out=ds.amax_slot(ctx.slot))
            wq, sw = fp8.quantize(w, "e4m3")
            y = self._fp8_gemm(xq, "e4m3", sx, wq, "e4m3", sw, x.dtype)
        elif ctx.mode == "nvfp4":
            y = _fp4_gemm(nvfp4.quantize(x2), nvfp4.quantize(w, block_2d=True), x.dtype)
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
            sdy = fp8.scale_from_amax(fp8.abs_max(dy2), "e5m2", self.margin)
            if need_dx:
                w = _plain(w, dy.dtype)
                sw = fp8.scale_from_amax(fp8.abs_max(w), "e4m3")
                dyq = fp8.encode(dy2, sdy, "e5m2")
                dx = self._fp8_gemm(dyq, "e5m2", sdy, fp8.encode_transpose(w, sw, "e4m3"), "e4m3", sw, dy.dtype)
            if need_dw:
                x2 = x.reshape(-1, x.shape[-1])
                sx = self._delayed_scaling(x.device).scale_slot(ctx.slot)  # the forward's scale
                dyq_t = fp8.encode_transpose(dy2, sdy, "e5m2")
                xq_t = fp8.encode_transpose(x2, sx, "e4m3")
                dw = self._fp8_gemm(dyq_t, "e5m2", sdy, xq_t, "e4m3", sx, out_dtype)
        elif ctx.mode == "nvfp4":
            if need_dx:
                w = _plain(w, dy.dtype)
                dyq = nvfp4.quantize(dy2, stochastic=True, seed=self._seed(ctx, _SR_DGRAD, dy.device))
                wq_t = nvfp4.quantize(w.t().contiguous(), block_2d=True)  # the forward's tiles, transposed
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

    def _fp8_gemm(self, a, a_fmt, a_scale, b_t, b_fmt, b_scale, out_dtype):
        """(a / a_scale) @ (b_t / b_scale)^T for FP8 codes a [M, K] and b_t [N, K] (row-major)."""
        a_inv = torch.reciprocal(a_scale).reshape(())
        b_inv = torch.reciprocal(b_scale).reshape(())
        if self._use_scaled_mm(a, b_t):
            a8 = a.view(fp8.FORMATS[a_fmt].torch_dtype)
            b8 = b_t.view(fp8.FORMATS[b_fmt].torch_dtype)
            return torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)
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
            return (
                f"recipe fp8-hybrid on {where}: forward E4M3 x E4M3, dgrad/wgrad E5M2 gradients x E4M3; "
                f"delayed scaling for activations (amax history {self.amax_history_len}, margin {self.margin}), "
                f"just-in-time per-tensor scales for weights and gradients; GEMMs: {gemm}; lm_head and embeddings "
                f"in BF16{skip}; {layers}."
            )
        return (
            f"recipe nvfp4 on {where}: E2M1 values, 16-value blocks with E4M3 scales and an FP32 global scale "
            f"(16x16 tiles for weights), stochastic rounding for gradients, 16-point random Hadamard on the wgrad "
            f"inputs. No FP4 GEMM runs here (Hopper and older have no FP4 tensor cores; Blackwell's are not wired): "
            f"operands are quantised exactly and the GEMMs run in {'BF16' if cc else 'fp32'} on the dequantised "
            f"values - NVFP4 accuracy, not NVFP4 speed; lm_head and embeddings in BF16{skip}; {layers}."
        )


def _plain(w, dtype) -> torch.Tensor:
    if isinstance(w, QuantizedWeight):
        return w.dequantize(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    return w.to(dtype) if w.dtype != dtype else w


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
