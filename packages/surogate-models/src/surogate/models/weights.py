"""Hugging Face safetensors <-> our fused parameter layout.

Our parameters keep Hugging Face's names except two fused projections per layer:
    model.layers.{i}.self_attn.qkv_proj.{weight,bias} = cat(q_proj, k_proj, v_proj) along rows (dim 0)
    model.layers.{i}.mlp.gate_up_proj.weight          = cat(gate_proj, up_proj) along rows
Loading reads model.safetensors or a sharded model.safetensors.index.json (safetensors only, never pickle),
checks every tensor's presence, shape and dtype (bf16 / fp16 / fp32), and converts to the requested dtype while
copying into the fused buffers. Saving splits the fused tensors back into Hugging Face names and writes the
same files the source had (same shard names, so the same shard count), a fresh index, and config.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._errors import ModelError
from .config import ModelConfig

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SOURCE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass
class Layout:
    """Where each Hugging Face tensor lived in the source folder, so that saving writes the same files."""

    weight_map: dict[str, str] = field(default_factory=dict)  # HF name -> file name
    sharded: bool = False
    source: str | None = None


def fused_names(config: ModelConfig) -> dict[str, list[str]]:
    """Our parameter name -> the Hugging Face names concatenated (along dim 0) into it."""
    out = {"model.embed_tokens.weight": ["model.embed_tokens.weight"], "model.norm.weight": ["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = [p + "input_layernorm.weight"]
        out[a + "qkv_proj.weight"] = [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]
        if config.qkv_bias:
            out[a + "qkv_proj.bias"] = [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
        if config.qk_norm:
            out[a + "q_norm.weight"] = [a + "q_norm.weight"]
            out[a + "k_norm.weight"] = [a + "k_norm.weight"]
        out[a + "o_proj.weight"] = [a + "o_proj.weight"]
        if config.o_bias:
            out[a + "o_proj.bias"] = [a + "o_proj.bias"]
        out[p + "post_attention_layernorm.weight"] = [p + "post_attention_layernorm.weight"]
        out[p + "mlp.gate_up_proj.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        out[p + "mlp.down_proj.weight"] = [p + "mlp.down_proj.weight"]
    return out


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor we read, with its expected shape."""
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        for name, rows in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
            shapes[a + name + ".weight"] = (rows, c.hidden_size)
            if c.qkv_bias:
                shapes[a + name + ".bias"] = (rows,)
        shapes[a + "o_proj.weight"] = (c.hidden_size, c.q_size)
        if c.o_bias:
            shapes[a + "o_proj.bias"] = (c.hidden_size,)
        if c.qk_norm:
            shapes[a + "q_norm.weight"] = (c.head_dim,)
            shapes[a + "k_norm.weight"] = (c.head_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    return shapes


# ------------------------------------------------------------------------------------------------ load
def _source_files(path: Path) -> tuple[dict[str, str], bool]:
    """-> (HF name -> file name for sharded sources, or {} for a single file; sharded?)."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: not a safetensors index (need a `weight_map`): {e}. Re-download it.") from None
        for file in sorted(set(weight_map.values())):
            if not (path / file).is_file():
                raise ModelError(f"{path / file}: shard listed in {INDEX} is missing. Re-download the model.")
        return dict(weight_map), True
    if (path / SINGLE).is_file():
        return {}, False
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ModelError(
            f"{path}: only pickle weights (*.bin / *.pt) found; surogate loads safetensors only (no pickle). "
            "Convert with transformers: AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, "
            "safe_serialization=True)."
        )
    raise ModelError(f"{path}: no {SINGLE} or {INDEX}. Point to a Hugging Face model folder with safetensors weights.")


class _Reader:
    """Opens each safetensors file once; every error names the file and the tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.handles = {}

    def open(self, file: str):
        if file not in self.handles:
            from safetensors import safe_open

            try:
                self.handles[file] = safe_open(str(self.path / file), framework="pt", device="cpu")
            except Exception as e:
                raise ModelError(f"{self.path / file}: corrupt or unreadable safetensors file ({e}). "
                                 "Re-download it.") from None
        return self.handles[file]

    def keys(self, file: str) -> set[str]:
        return set(self.open(file).keys())

    def read(self, file: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        f = self.open(file)
        where = f"{self.path / file}: tensor `{name}`"
        try:
            sl = f.get_slice(name)
            found, kind = tuple(sl.get_shape()), sl.get_dtype()
        except Exception as e:
            raise ModelError(f"{where} cannot be read ({e}). Re-download the file.") from None
        if found != shape:
            raise ModelError(f"{where} has shape {list(found)}, config.json implies {list(shape)}. "
                             "The weights do not match config.json.")
        if kind not in _SOURCE_DTYPES:
            raise ModelError(f"{where} has dtype {kind}; only BF16, F16 and F32 checkpoints are supported.")
        try:
            return f.get_tensor(name)
        except Exception as e:
            raise ModelError(f"{where} cannot be read ({e}): the file is truncated or corrupt. "
                             "Re-download it.") from None


def load_hf(path: str | Path, config: ModelConfig, dtype: torch.dtype, device, convert=None) -> tuple[dict, Layout]:
    """-> (our parameter name -> tensor of `dtype` on `device`, the source Layout). convert(name, tensor), when
    given, replaces each tensor as soon as it is read (QLoRA quantises the base weights while loading, so only one
    full-precision weight is on the device at a time)."""
    path = Path(path)
    weight_map, sharded = _source_files(path)
    reader = _Reader(path)
    shapes = hf_shapes(config)
    if not sharded:
        present = reader.keys(SINGLE)
        weight_map = {name: SINGLE for name in present}
    for name in shapes:
        if name not in weight_map:
            where = path / (INDEX if sharded else SINGLE)
            raise ModelError(f"{where}: tensor `{name}` is missing; the checkpoint does not match config.json "
                             f"({config.architecture}, {config.num_layers} layers).")
    tensors = {}
    for ours, names in fused_names(config).items():
        rows = sum(shapes[n][0] for n in names)
        out = torch.empty((rows, *shapes[names[0]][1:]), dtype=dtype, device=device)
        start = 0
        for n in names:
            t = reader.read(weight_map[n], n, shapes[n])
            out[start : start + t.shape[0]].copy_(t)
            start += t.shape[0]
        tensors[ours] = out if convert is None else convert(ours, out)
        del out
    kept = {n: f for n, f in weight_map.items() if n in shapes or n == "lm_head.weight"}
    return tensors, Layout(weight_map=kept, sharded=sharded, source=str(path))


# ------------------------------------------------------------------------------------------------ save
def _hf_tensor(name: str, state: dict, config: ModelConfig, where: dict) -> torch.Tensor:
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return state["model.embed_tokens.weight"].detach().cpu().clone()
    ours, start, stop = where[name]
    return state[ours].detach()[start:stop].cpu().clone()  # a copy: safetensors refuses tensors sharing memory


def save_hf(path: str | Path, config: ModelConfig, state: dict[str, torch.Tensor], layout: Layout | None):
    """Write `state` (our names) as Hugging Face safetensors + config.json, sharded like `layout`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(config)
    where = {}
    for ours, names in fused_names(config).items():
        start = 0
        for n in names:
            where[n] = (ours, start, start + shapes[n][0])
            start += shapes[n][0]
    if layout is not None and layout.weight_map:
        files = dict(layout.weight_map)
    else:
        files = {n: SINGLE for n in shapes}
    for n in shapes:  # a tensor the source's index lacked goes to the last file
        files.setdefault(n, sorted(set(files.values()))[-1])
    sharded = layout.sharded if layout is not None else False
    if not sharded:
        files = {n: SINGLE for n in files}
    _remove_stale(path, set(files.values()), sharded)
    dtype = state["model.embed_tokens.weight"].dtype
    total = 0
    for file in sorted(set(files.values())):
        shard = {n: _hf_tensor(n, state, config, where) for n in sorted(files) if files[n] == file}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        tmp = path / (file + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / file)
    if sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(files.items()))}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(dtype), indent=2, sort_keys=True) + "\n")


def _remove_stale(path: Path, files: set[str], sharded: bool) -> None:
    """Weight files of an earlier save in the same folder would mix with ours (transformers prefers the index)."""
    stale = [path / SINGLE, path / INDEX, *path.glob("model-*-of-*.safetensors")]
    for f in stale:
        if f.is_file() and f.name not in files and not (sharded and f.name == INDEX):
            f.unlink()
