"""CausalLM: a Llama / Qwen2 / Qwen3 decoder whose blocks are explicit autograd Functions.

Parameters carry Hugging Face names, except the fused qkv_proj (= q; k; v rows) and gate_up_proj (= gate; up
rows); see weights.py. LoRA adapters sit under peft's names (model.layers.0.self_attn.q_proj.lora_A.weight).
A forward call flattens the batch to rows of tokens, finds the packed documents from the position ids once,
and runs per layer AttentionHalf + MlpHalf (or one RecomputedBlock with recompute_block). Numerics: everything
in the model dtype (bf16 on GPU), fp32 inside norms, RoPE, softmax and cross-entropy.

Low precision (see _quant.py): the model's Recipe (bf16 / fp8-hybrid / nvfp4) gives each base linear layer (qkv, o,
gate_up, down) a context once, at construction; a layer whose context is quantised, or whose frozen base weight is
a QLoRA QuantizedWeight (then held in `layer.base`, not a parameter), gets a Gemm that runs its GEMMs. Everything
else (the default: recipe bf16 without QLoRA) runs the plain torch GEMMs with no extra work.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surogate.quant import QuantizedWeight, Recipe

from . import _ops, _quant, weights
from ._errors import ModelError
from ._host_weights import HostWeights
from ._offload import OffloadBuffers, check_recompute
from ._recompute import Recompute
from .blocks import attention, mlp
from .blocks._context import BlockContext
from .blocks._documents import build_documents
from .blocks._gemm import Gemm
from .blocks.block import RecomputedBlock
from .blocks.head import Embedding, FinalNorm, FusedLoss, loss_without_grad
from .config import ModelConfig
from .lora import TARGET_MODULES, LoraConfig, init_adapter, module_shape, parent, read_adapter, save_adapter

# LoRA target module -> its slot prefix in the attention / MLP half and the fused tensor it adds to
_SLOT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}  # fmt: skip


class _Params(nn.Module):
    """Parameters under fixed names (weight, bias), so that state names follow Hugging Face's."""

    def __init__(self, trainable: bool, **tensors):
        super().__init__()
        for name, t in tensors.items():
            if t is not None:
                self.register_parameter(name, nn.Parameter(t, requires_grad=trainable))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, t: dict, trainable: bool):
        super().__init__()
        self.base: dict[str, QuantizedWeight] = {}  # QLoRA: frozen base weights by GEMM (qkv, o, gate_up, down)
        self.gemms: dict[str, Gemm] | None = None  # GEMMs that are not plain torch ones (bind_recipe)
        self.input_layernorm = _Params(trainable, weight=t["input_layernorm.weight"])
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = _Params(trainable, weight=self._weight(t, "qkv"),
                                          bias=t.get("self_attn.qkv_proj.bias"))
        self.self_attn.o_proj = _Params(trainable, weight=self._weight(t, "o"), bias=t.get("self_attn.o_proj.bias"))
        if config.qk_norm:
            self.self_attn.q_norm = _Params(trainable, weight=t["self_attn.q_norm.weight"])
            self.self_attn.k_norm = _Params(trainable, weight=t["self_attn.k_norm.weight"])
        self.post_attention_layernorm = _Params(trainable, weight=t["post_attention_layernorm.weight"])
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = _Params(trainable, weight=self._weight(t, "gate_up"))
        self.mlp.down_proj = _Params(trainable, weight=self._weight(t, "down"))

    def _weight(self, t: dict, gemm: str) -> torch.Tensor | None:
        """A base linear weight as a parameter, or None when it is a QLoRA QuantizedWeight (kept in self.base)."""
        w = t[_quant.BASE_LINEARS[gemm]]
        if isinstance(w, QuantizedWeight):
            self.base[gemm] = w
            return None
        return w

    def bind_recipe(self, recipe: Recipe, index: int) -> None:
        """Register the four base linear layers with the recipe, once; a Gemm only where the GEMMs are not plain."""
        gemms = {}
        for gemm, name in (("qkv", "qkv_proj"), ("o", "o_proj"), ("gate_up", "gate_up_proj"), ("down", "down_proj")):
            ctx = recipe.linear(name, index)
            base = self.base.get(gemm)
            if ctx.mode != "bf16" or base is not None:
                gemms[gemm] = Gemm(recipe, ctx, base)
        self.gemms = gemms or None

    # LoRA adapters live at <parent>.<module>.lora_A / lora_B (peft's names)
    def set_adapter(self, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        owner = getattr(self, parent(module))
        holder = getattr(owner, module, None)
        if holder is None:
            holder = nn.Module()
            setattr(owner, module, holder)
        holder.lora_A = _Params(True, weight=a)
        holder.lora_B = _Params(True, weight=b)

    def adapter(self, module: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        holder = getattr(getattr(self, parent(module)), module, None)
        if holder is None or not hasattr(holder, "lora_A"):
            return None, None
        return holder.lora_A.weight, holder.lora_B.weight

    def remove_adapter(self, module: str) -> None:
        owner = getattr(self, parent(module))
        holder = getattr(owner, module, None)
        if holder is not None and hasattr(holder, "lora_A"):
            del holder.lora_A, holder.lora_B
            if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                delattr(owner, module)

    def attention_tensors(self) -> tuple:
        a = self.self_attn
        t = {
            "ln": self.input_layernorm.weight,
            "qkv": getattr(a.qkv_proj, "weight", None),
            "qkv_bias": getattr(a.qkv_proj, "bias", None),
            "q_norm": a.q_norm.weight if hasattr(a, "q_norm") else None,
            "k_norm": a.k_norm.weight if hasattr(a, "k_norm") else None,
            "o": getattr(a.o_proj, "weight", None),
            "o_bias": getattr(a.o_proj, "bias", None),
        }
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{_SLOT[m]}_A"], t[f"{_SLOT[m]}_B"] = self.adapter(m)
        return tuple(t[s] for s in attention.SLOTS)

    def mlp_tensors(self) -> tuple:
        t = {"ln": self.post_attention_layernorm.weight, "gate_up": getattr(self.mlp.gate_up_proj, "weight", None),
             "down": getattr(self.mlp.down_proj, "weight", None)}  # fmt: skip
        for m in ("gate_proj", "up_proj", "down_proj"):
            t[f"{_SLOT[m]}_A"], t[f"{_SLOT[m]}_B"] = self.adapter(m)
        return tuple(t[s] for s in mlp.SLOTS)


class CausalLM(nn.Module):
    """model(input_ids, position_ids=None) -> logits; .loss(...) / .loss_sum(...) through the fused CE.

    recipe: "bf16" (default) / "fp8-hybrid" / "nvfp4" or a surogate.quant.Recipe for config.num_layers: how the
    base linear layers' GEMMs run. qlora: None / "fp8" / "nvfp4" / "nf4": the frozen base weights (qkv, o, gate_up,
    down) stored quantised (tensors may already hold QuantizedWeights; plain ones are quantised here), LoRA required;
    qlora_options: {"tile"} for fp8, {"block_size", "double_quant"} for nf4. offload_residual: see
    set_offload_residual."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], *, lora: LoraConfig | None = None,
                 recompute: str | dict | Recompute | None = None, layout: weights.Layout | None = None,
                 recipe: str | Recipe | None = None, qlora: str | None = None, qlora_options: dict | None = None,
                 offload_residual: bool = False):
        super().__init__()
        if config.num_layers < 1:
            raise ModelError("num_hidden_layers must be >= 1")
        self.config = config
        self.recompute = Recompute.parse(recompute)
        self.set_offload_residual(offload_residual)
        self.layout = layout
        self.recipe = _quant.resolve_recipe(recipe, config)
        options = _quant.check_qlora(qlora, qlora_options, lora, config)
        self.qlora = qlora
        convert = _quant.quantizer(qlora, options, tensors["model.embed_tokens.weight"].dtype)
        if convert is not None:
            tensors = {name: convert(name, t) for name, t in tensors.items()}
        trainable = lora is None
        self.model = nn.Module()
        self.model.embed_tokens = _Params(trainable, weight=tensors["model.embed_tokens.weight"])
        self.model.layers = nn.ModuleList()
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            local = {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}
            self.model.layers.append(DecoderLayer(config, local, trainable))
        self.model.norm = _Params(trainable, weight=tensors["model.norm.weight"])
        if not config.tie_word_embeddings:
            self.lm_head = _Params(trainable, weight=tensors["lm_head.weight"])
        weight = tensors["model.embed_tokens.weight"]
        inv_freq = _ops.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.float().to(weight.device), persistent=False)
        for i, layer in enumerate(self.model.layers):
            layer.bind_recipe(self.recipe, i)
        # optional callable(tensors) -> tensors: what the Functions compute with instead of the parameters (ZeRO-3:
        # surogate.dist.GatheredParameters gathers the sharded ones per layer); None: the parameters themselves
        self.weights_provider = None
        self.host_weights: HostWeights | None = None  # offload_weights (set_offload_weights)
        self.lora_config: LoraConfig | None = None
        if lora is not None:
            self._add_adapters(lora)

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .cpu() move the QLoRA base weights (not nn.Parameters) along with the parameters."""
        super()._apply(fn, recurse)
        device = self.model.embed_tokens.weight.device
        for layer in self.model.layers:
            for gemm, q in layer.base.items():
                if q.device != device:
                    layer.base[gemm] = layer.gemms[gemm].base = q.to(device)
        return self

    # ------------------------------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def _head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _weights(self, *tensors) -> tuple:
        """The tensors as the Functions get them: unchanged, or streamed (offload_weights) / weights_provider's
        (e.g. gathered) weights."""
        if self.host_weights is not None:
            tensors = self.host_weights(tensors)
        return tensors if self.weights_provider is None else self.weights_provider(tensors)

    def _provided_lookup(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The input embeddings from the weights provider's own lookup (ZeRO-3 reads each rank's shard instead of
        gathering the table), or None: look them up in the (provided) table."""
        lookup = getattr(self.weights_provider, "embedding_lookup", None)
        return None if lookup is None else lookup(self.model.embed_tokens.weight, ids)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        """Every weight, QLoRA base weights included (they are not nn.Parameters)."""
        base = sum(q.shape.numel() for layer in self.model.layers for q in layer.base.values())
        return base + sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------ recipe
    def memory_report(self) -> _quant.MemoryReport:
        """Bytes of the weights (QLoRA-quantised and dense), the adapters, and one line for the run log that ends
        with the recipe's describe() (which says, e.g., that NVFP4 GEMMs run on dequantised BF16 below SM 100)."""
        return _quant.memory_report(self)

    def after_optimizer_step(self) -> None:
        """The trainer calls this once after every optimizer step: fp8-hybrid rolls the amax histories and updates
        the delayed scales, nvfp4 advances its stochastic-rounding seeds; bf16 does nothing. Device ops only (no
        host sync): run it eagerly after the optimizer step (or its graph replay), or capture it into the
        optimizer-step graph, but then restore recipe_state_dict() after the capture's warm-up run."""
        self.recipe.after_optimizer_step()

    def recipe_state_dict(self) -> dict[str, torch.Tensor]:
        """The recipe's state (fp8: amax_history, scale, scale_inv; nvfp4: seed_step), copies for a checkpoint.
        Empty for bf16, and before the first forward pass (the state is created on first use)."""
        return {k: v.detach().clone() for k, v in self.recipe.state_dict().items() if v is not None}

    def load_recipe_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore recipe_state_dict() (e.g. from a checkpoint, on any device) so that a resumed run quantises as
        the interrupted one would have."""
        n_fp8 = sum(c.mode == "fp8" for c in self.recipe.contexts)
        if "scale" in state and state["scale"].numel() != n_fp8:
            raise ModelError(f"recipe state holds FP8 scales for {state['scale'].numel()} linear layers, this model "
                             f"has {n_fp8} (recipe {self.recipe.name}): resume with the same recipe, layers and "
                             "skip_quant_* settings.")
        try:
            self.recipe.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        except (KeyError, ValueError) as e:
            raise ModelError(f"recipe state does not fit recipe {self.recipe.name}: {e}") from None

    # ------------------------------------------------------------------------------------------ offload
    def set_offload_residual(self, on: bool) -> None:
        """offload_residual (needs recompute_block): each layer's kept input residual goes to (pinned) host memory
        after its forward and comes back two layers ahead in backward (see _offload.py), so activation memory no
        longer grows with depth. Copies only: the numbers do not change. CUDA-graph capturable once one step ran
        eagerly (that step allocates the host buffers)."""
        if on:
            check_recompute(self.recompute)
        self.offload_residual = bool(on)
        self._offload = OffloadBuffers() if on else None

    def set_offload_weights(self, device: str | torch.device | None = None) -> None:
        """offload_weights (LoRA, bf16 recipe): every layer's frozen base weights (qkv, o, gate_up, down) move to
        (pinned) host memory and stream to `device` (default: the model's) a layer ahead of use, forward and
        backward (see _host_weights.py); they become placeholders there. The model's other tensors stay where they
        are: load_pretrained builds the model on the CPU, calls this, then moves the rest. Copies only: the numbers
        do not change. CUDA-graph capturable."""
        if self.lora_config is None:
            raise ModelError("offload_weights streams the frozen base weights of LoRA training; full fine-tuning "
                             "updates them (use offload_master / offload_optimizer instead)")
        if self.qlora is not None or self.recipe.name != "bf16":
            raise ModelError(f"offload_weights streams bf16 base weights; this model has "
                             f"{'QLoRA ' + self.qlora if self.qlora else 'recipe ' + self.recipe.name}: use one or "
                             "the other")
        if self.host_weights is not None or self.weights_provider is not None:
            raise ModelError("offload_weights: the weights already come from a provider (offload_weights or ZeRO-3)")
        layers = [[m.weight for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                      layer.mlp.down_proj)] for layer in self.model.layers]
        self.host_weights = HostWeights(layers, torch.device(device) if device is not None else self.device)

    def offloaded_bytes(self) -> int:
        """Bytes this model keeps in host memory: offload_residual's residual buffers (allocated by the first
        training forward) and offload_weights' frozen base weights."""
        n = self._offload.nbytes()[0] if self._offload is not None else 0
        return n + (self.host_weights.nbytes()[0] if self.host_weights is not None else 0)

    # ------------------------------------------------------------------------------------------ compute
    def _uses_flash(self) -> bool:
        d = self.config.head_dim
        return self.device.type == "cuda" and self.dtype == torch.bfloat16 and d % 8 == 0 and d <= 256

    def _hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cu_seqlens=None):
        """-> final-norm hidden states [batch * seq, C] and the (batch, seq) shape."""
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be [batch, seq] or [seq], got shape {list(input_ids.shape)}")
        ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
        batch, seq = ids.shape
        if position_ids is not None:
            position_ids = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
            position_ids = position_ids.expand(batch, seq) if position_ids.shape[0] == 1 else position_ids
            if tuple(position_ids.shape) != (batch, seq):
                raise ValueError(f"position_ids shape {list(position_ids.shape)} != input_ids {[batch, seq]}")
        device = self.device
        flash = self._uses_flash()
        docs = build_documents(batch, seq, position_ids, device, flash, cu_seqlens)
        lora = self.lora_config
        bc = BlockContext(
            config=self.config, docs=docs, inv_freq=self.inv_freq.float(), recompute=self.recompute, flash=flash,
            lora_scale=lora.scale if lora else 1.0, dropout=lora.dropout if (lora and self.training) else 0.0,
            offload=self._offload.begin(device) if self._offload is not None and torch.is_grad_enabled() else None,
        )
        flat_ids = ids.reshape(-1).to(device=device, dtype=torch.int64)
        x = self._provided_lookup(flat_ids)
        if x is None:
            (embed,) = self._weights(self.model.embed_tokens.weight)
            x = Embedding.apply(flat_ids, embed)
        residual, delta = x, None
        n_att = len(attention.SLOTS)
        streamed = self.host_weights
        if streamed is not None:
            streamed.begin()
        with streamed.hooks() if streamed is not None else nullcontext():
            for layer in self.model.layers:
                tensors = self._weights(*layer.attention_tensors(), *layer.mlp_tensors())
                if self.recompute.block:
                    residual, delta = RecomputedBlock.apply(residual, delta, bc, layer.gemms, *tensors)
                else:
                    residual, delta = attention.AttentionHalf.apply(residual, delta, bc, layer.gemms,
                                                                    *tensors[:n_att])
                    residual, delta = mlp.MlpHalf.apply(residual, delta, bc, layer.gemms, *tensors[n_att:])
        hidden = FinalNorm.apply(residual, delta, *self._weights(self.model.norm.weight), self.config.rms_norm_eps)
        return hidden, (batch, seq), input_ids.dim() == 1

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] ([seq, vocab] for 1-D input), in the model dtype. For small inputs: the
        loss methods never build the full logits.

        position_ids [batch, seq]: RoPE positions; a reset (any jump) starts a new packed document, and attention
        never crosses documents. cu_seqlens (optional, int32, on the device): the documents over the flattened
        tokens, given by callers that capture CUDA graphs (a start at every row start; may be padded at the end
        with repeats of the token count): no host sync then."""
        hidden, (batch, seq), flat = self._hidden(input_ids, position_ids, cu_seqlens)
        logits = F.linear(hidden, *self._weights(self._head_weight()))
        return logits.view(seq, -1) if flat else logits.view(batch, seq, -1)

    def _targets(self, labels: torch.Tensor, rows: int) -> torch.Tensor:
        if labels.numel() != rows:
            raise ValueError(f"labels has {labels.numel()} elements, input_ids {rows}: they must match")
        return labels.reshape(-1).to(device=self.device, dtype=torch.int64)

    def loss(self, input_ids, labels, position_ids=None, grad_scale=1.0, *, cu_seqlens=None) -> torch.Tensor:
        """Mean cross-entropy over valid tokens (labels != -100; labels[t] is predicted from tokens <= t).
        The value is the plain mean; its gradient is grad_scale * d(mean) (grad_scale: float or 0-d tensor)."""
        return self._loss(input_ids, labels, position_ids, cu_seqlens, True, grad_scale)[0]

    def loss_sum(self, input_ids, labels, position_ids=None, *, cu_seqlens=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of cross-entropy over valid tokens (fp32 0-d), number of valid tokens (int64 0-d)); for gradient
        accumulation normalised by the valid tokens of all micro-batches: (loss_sum / total).backward()."""
        return self._loss(input_ids, labels, position_ids, cu_seqlens, False, 1.0)

    def _loss(self, input_ids, labels, position_ids, cu_seqlens, mean: bool, grad_scale):
        hidden, _, _ = self._hidden(input_ids, position_ids, cu_seqlens)
        (weight,) = self._weights(self._head_weight())
        targets = self._targets(labels, hidden.shape[0])
        if not (hidden.requires_grad or weight.requires_grad):  # no_grad / eval: no gradient work at all
            return loss_without_grad(hidden, weight, targets, mean)
        return FusedLoss.apply(hidden, weight, targets, mean, grad_scale)

    # ------------------------------------------------------------------------------------------ LoRA
    def _add_adapters(self, lora: LoraConfig, tensors: dict[str, torch.Tensor] | None = None) -> None:
        for name, p in self.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(False)
        for i, layer in enumerate(self.model.layers):
            for m in TARGET_MODULES:
                layer.remove_adapter(m)
            for m in lora.target_modules:
                if tensors is None:
                    a, b = init_adapter(self.config, m, lora.rank)
                else:
                    a, b = (self._adapter_tensor(tensors, i, m, part, lora) for part in ("A", "B"))
                layer.set_adapter(m, a.to(self.device, self.dtype), b.to(self.device, self.dtype))
        self.lora_config = lora

    def _adapter_tensor(self, tensors, i, module, part, lora):
        name = f"model.layers.{i}.{parent(module)}.{module}.lora_{part}.weight"
        if name not in tensors:
            raise ModelError(f"adapter tensor `{name}` is missing from the adapter file.")
        fan_in, fan_out = module_shape(self.config, module)
        shape = (lora.rank, fan_in) if part == "A" else (fan_out, lora.rank)
        if tuple(tensors[name].shape) != shape:
            raise ModelError(f"adapter tensor `{name}` has shape {list(tensors[name].shape)}, expected {list(shape)}.")
        return tensors[name]

    def load_adapter(self, path: str | Path) -> None:
        """Replace the adapters with a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors);
        the base weights become frozen (LoRA mode)."""
        lora, tensors = read_adapter(path)
        self._add_adapters(lora, tensors)

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if ".lora_" in n}

    def save_adapter(self, path: str | Path) -> None:
        if self.lora_config is None:
            raise ModelError("save_adapter: this model has no LoRA adapters (load it with lora=LoraConfig(...)).")
        base = self.layout.source if self.layout is not None else None
        save_adapter(path, self.lora_config, self._adapter_state(), base)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """W += scale * B A for every adapter (in fp32, rounded once), then drop the adapters: the result equals
        peft's merge_and_unload. The merged base weights stay frozen."""
        lora = self.lora_config
        if lora is None:
            return
        if self.qlora is not None:
            raise ModelError(f"merge_lora: the base weights are QLoRA-quantised ({self.qlora}); merging into them is "
                             "lossy. Save the adapter (save_adapter) and merge it into the original bf16 base model "
                             "with `surogate merge`.")
        if self.host_weights is not None:
            raise ModelError("merge_lora: the base weights stream from host memory (offload_weights) and are "
                             "placeholders here. Save the adapter (save_adapter) and merge it into the base model "
                             "with `surogate merge`.")
        c = self.config
        rows = {"q_proj": (0, c.q_size), "k_proj": (c.q_size, c.q_size + c.kv_size),
                "v_proj": (c.q_size + c.kv_size, c.qkv_size), "o_proj": (0, c.hidden_size),
                "gate_proj": (0, c.intermediate_size), "up_proj": (c.intermediate_size, 2 * c.intermediate_size),
                "down_proj": (0, c.hidden_size)}  # fmt: skip
        for layer in self.model.layers:
            a_ = layer.self_attn
            base = {"q_proj": a_.qkv_proj, "k_proj": a_.qkv_proj, "v_proj": a_.qkv_proj, "o_proj": a_.o_proj,
                    "gate_proj": layer.mlp.gate_up_proj, "up_proj": layer.mlp.gate_up_proj,
                    "down_proj": layer.mlp.down_proj}  # fmt: skip
            for m in lora.target_modules:
                a, b = layer.adapter(m)
                w = base[m].weight
                start, stop = rows[m]
                delta = (b.float() @ a.float()) * lora.scale
                w[start:stop] = (w[start:stop].float() + delta).to(w.dtype)
                layer.remove_adapter(m)
        self.lora_config = None

    # ------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | Path) -> None:
        """Hugging Face layout: safetensors with the original names and sharding, plus config.json."""
        if self.qlora is not None:
            raise ModelError(f"save_pretrained: the base weights are QLoRA-quantised ({self.qlora}); writing merged "
                             "weights from them would be lossy. Save the adapter with save_adapter() and merge it "
                             "into the original bf16 base model with `surogate merge`.")
        if self.lora_config is not None:
            raise ModelError("save_pretrained: the model has LoRA adapters that are not merged. Call merge_lora() "
                             "first to save merged weights, or save_adapter() to save the adapter alone.")
        state = {n: p for n, p in self.named_parameters()}
        weights.save_hf(path, self.config, state, self.layout)
        if self.layout is not None and self.layout.source:
            gen = Path(self.layout.source) / "generation_config.json"
            dest = Path(path) / "generation_config.json"
            if gen.is_file() and gen.resolve() != dest.resolve():
                dest.write_text(gen.read_text())
