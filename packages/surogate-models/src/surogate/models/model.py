"""CausalLM: a Llama / Qwen2 / Qwen3 decoder whose blocks are explicit autograd Functions.

Parameters carry Hugging Face names, except the fused qkv_proj (= q; k; v rows) and gate_up_proj (= gate; up
rows); see weights.py. LoRA adapters sit under peft's names (model.layers.0.self_attn.q_proj.lora_A.weight).
A forward call flattens the batch to rows of tokens, finds the packed documents from the position ids once,
and runs per layer AttentionHalf + MlpHalf (or one RecomputedBlock with recompute_block). Numerics: everything
in the model dtype (bf16 on GPU), fp32 inside norms, RoPE, softmax and cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops, weights
from ._errors import ModelError
from ._recompute import Recompute
from .blocks import attention, mlp
from .blocks._context import BlockContext
from .blocks._documents import build_documents
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
        self.input_layernorm = _Params(trainable, weight=t["input_layernorm.weight"])
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = _Params(trainable, weight=t["self_attn.qkv_proj.weight"],
                                          bias=t.get("self_attn.qkv_proj.bias"))
        self.self_attn.o_proj = _Params(trainable, weight=t["self_attn.o_proj.weight"],
                                        bias=t.get("self_attn.o_proj.bias"))
        if config.qk_norm:
            self.self_attn.q_norm = _Params(trainable, weight=t["self_attn.q_norm.weight"])
            self.self_attn.k_norm = _Params(trainable, weight=t["self_attn.k_norm.weight"])
        self.post_attention_layernorm = _Params(trainable, weight=t["post_attention_layernorm.weight"])
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = _Params(trainable, weight=t["mlp.gate_up_proj.weight"])
        self.mlp.down_proj = _Params(trainable, weight=t["mlp.down_proj.weight"])

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
            "qkv": a.qkv_proj.weight,
            "qkv_bias": getattr(a.qkv_proj, "bias", None),
            "q_norm": a.q_norm.weight if hasattr(a, "q_norm") else None,
            "k_norm": a.k_norm.weight if hasattr(a, "k_norm") else None,
            "o": a.o_proj.weight,
            "o_bias": getattr(a.o_proj, "bias", None),
        }
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{_SLOT[m]}_A"], t[f"{_SLOT[m]}_B"] = self.adapter(m)
        return tuple(t[s] for s in attention.SLOTS)

    def mlp_tensors(self) -> tuple:
        t = {"ln": self.post_attention_layernorm.weight, "gate_up": self.mlp.gate_up_proj.weight,
             "down": self.mlp.down_proj.weight}  # fmt: skip
        for m in ("gate_proj", "up_proj", "down_proj"):
            t[f"{_SLOT[m]}_A"], t[f"{_SLOT[m]}_B"] = self.adapter(m)
        return tuple(t[s] for s in mlp.SLOTS)


class CausalLM(nn.Module):
    """model(input_ids, position_ids=None) -> logits; .loss(...) / .loss_sum(...) through the fused CE."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], *, lora: LoraConfig | None = None,
                 recompute: str | dict | Recompute | None = None, layout: weights.Layout | None = None):
        super().__init__()
        if config.num_layers < 1:
            raise ModelError("num_hidden_layers must be >= 1")
        self.config = config
        self.recompute = Recompute.parse(recompute)
        self.layout = layout
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
        self.lora_config: LoraConfig | None = None
        if lora is not None:
            self._add_adapters(lora)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def _head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

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
        )
        x = Embedding.apply(ids.reshape(-1).to(device=device, dtype=torch.int64), self.model.embed_tokens.weight)
        residual, delta = x, None
        for layer in self.model.layers:
            if self.recompute.block:
                residual, delta = RecomputedBlock.apply(residual, delta, bc, *layer.attention_tensors(),
                                                        *layer.mlp_tensors())
            else:
                residual, delta = attention.AttentionHalf.apply(residual, delta, bc, *layer.attention_tensors())
                residual, delta = mlp.MlpHalf.apply(residual, delta, bc, *layer.mlp_tensors())
        hidden = FinalNorm.apply(residual, delta, self.model.norm.weight, self.config.rms_norm_eps)
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
        logits = F.linear(hidden, self._head_weight())
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
        weight = self._head_weight()
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
