"""Checkpoints: everything needed to continue a run exactly, written atomically, newest N kept.

output_dir/checkpoints/step_00000120/
    optimizer.safetensors   fp32 master weights of the trainable parameters + optimizer states (flat, per group:
                            group{i}.master, then exp_avg / exp_avg_sq for adamw, or the 8-bit m_codes / v_codes
                            (uint8) and m_absmax / v_absmax (fp32, one per 2048) for adamw_8bit; the same files
                            whether the states lived on the device or offloaded to host memory)
    rng.safetensors         torch CPU (and CUDA) generator states
    recipe.safetensors      the recipe's state, when it has one: fp8-hybrid's amax histories and delayed scales,
                            nvfp4's stochastic-rounding step (model.recipe_state_dict())
    state.json              step, rows consumed, the optimizer layout, the config keys a resume must match,
                            the data hash, format version
A checkpoint is written into a hidden temporary folder (.tmp-step_...), every file fsynced, then renamed to its
final name in one os.replace: a folder named step_* is always complete, and a run killed while writing leaves only
a temporary folder (removed by the next run) next to the previous complete checkpoint. Frozen base weights are not
in checkpoints: they are reloaded from `model`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .config import Config
from .errors import CheckpointError

FORMAT = 1
_NAME = re.compile(r"^step_(\d{8})$")
# keys that must not change between a checkpoint and its resume: the model, what is trained, the data stream
COMPAT_KEYS = ("model", "lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora",
               "qlora_fp8", "qlora_fp4", "qlora_bnb", "recipe", "optimizer", "sequence_len",
               "per_device_train_batch_size", "gradient_accumulation_steps", "seed")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def remove_partial(output_dir: str | Path) -> None:
    """Temporary folders of checkpoints whose writing was interrupted."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def compat_values(cfg: Config, dtype: str, data_hash: str) -> dict:
    values = {k: getattr(cfg, k) for k in COMPAT_KEYS}
    values["model"] = str(Path(cfg.model).resolve())
    if not cfg.lora:
        for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "qlora_fp8",
                  "qlora_fp4", "qlora_bnb"):
            values.pop(k)
    values["dtype"] = dtype
    values["data"] = data_hash
    return values


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])



def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final` (a sibling). An existing `final` is moved aside first and deleted
    after, so a crash leaves either the old or the new folder in place, never a half-written one."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)

def save(output_dir: str | Path, step: int, *, optimizer_tensors: dict[str, torch.Tensor], state: dict,
         keep: int, recipe_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`. Returns its folder."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(optimizer_tensors, tmp / "optimizer.safetensors")
    _save_tensors(rng_state(), tmp / "rng.safetensors")
    if recipe_tensors:
        _save_tensors(recipe_tensors, tmp / "recipe.safetensors")
    state = {"format": FORMAT, "step": step, **state}
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    replace_dir(tmp, final)  # the same step written again (a resumed run) replaces the old one
    _fsync_dir(root)
    for stale in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve(cfg: Config) -> Path | None:
    """The checkpoint folder to resume from, or None (resume_from_checkpoint false, or true with none written)."""
    value = cfg.resume_from_checkpoint
    if value is False:
        return None
    if value is True:
        found = list_checkpoints(cfg.output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / "state.json").is_file():
        raise CheckpointError("is not a complete checkpoint folder (no state.json)", file=str(path),
                              fix=f"point resume_from_checkpoint at a step_* folder under "
                                  f"{checkpoints_dir(cfg.output_dir)}, or set it to true for the newest")
    return path


def load(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (state.json, optimizer tensors, rng tensors)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as e:  # damaged by hand: the atomic write never leaves a partial folder under its final name
        raise CheckpointError(f"cannot be read ({type(e).__name__}: {e})", file=str(path),
                              fix="resume from an older checkpoint, or start a fresh output_dir") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"was written in checkpoint format {state.get('format')}, this version reads {FORMAT}",
                              file=str(path), fix="start a fresh output_dir")
    return state, tensors, rng


def load_recipe(path: Path) -> dict[str, torch.Tensor]:
    """The recipe state of checkpoint `path` ({} when it has none: recipe bf16, or written before recipes had state)."""
    from safetensors.torch import load_file

    file = path / "recipe.safetensors"
    if not file.is_file():
        return {}
    try:
        return load_file(str(file))
    except Exception as e:
        raise CheckpointError(f"cannot be read ({type(e).__name__}: {e})", file=str(file),
                              fix="resume from an older checkpoint, or start a fresh output_dir") from None


def check_compatible(path: Path, saved: dict, current: dict, saved_layout: dict, layout: dict) -> None:
    """Every difference between the checkpoint's run and this config, reported at once."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            if key == "data":
                diffs.append("the training data (files, tokenizer or data keys) changed")
            else:
                diffs.append(f"{key} was {saved.get(key)!r}, the config says {current.get(key)!r}")
    if not diffs and saved_layout != layout:
        diffs.append("the trainable parameters differ (names or shapes)")
    if diffs:
        raise CheckpointError("cannot resume: the checkpoint was made with a different config: " + "; ".join(diffs),
                              file=str(path), fix="set those keys back to the checkpoint's values, or start a fresh "
                                                  "output_dir (or resume_from_checkpoint: false)")
