"""Checkpoints of (sharded) master weights and optimizer state, in safetensors.

Two forms, both written by every rank calling `DataParallel.save_state(directory, gathered=...)`:
- gathered (default): rank 0 writes `optimizer.safetensors` with tensors `master` and `state.<name>` in the
  canonical order (groups concatenated, no padding), gathered bucket by bucket (peak extra device memory: one
  bucket). Loadable at any world size, ZeRO level and bucket size, as long as the group sizes match.
  Needs elementwise state (each state tensor shaped like the master).
- per rank: `rank{r}.safetensors` with the rank's own master/state part as it sits in memory. No gather, any
  state shapes; resume needs the same world size, ZeRO level and layout (a mismatch is an error naming both).
Metadata (strings): format, world_size, zero, group_sizes, buckets, state names, rank.
Only master weights and optimizer state are here: the trainer saves the step, schedule, RNG and data position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ._safetensors import load_file, read_metadata, save_file
from .world import DistError

if TYPE_CHECKING:
    from .data_parallel import DataParallel

GATHERED_NAME = "optimizer.safetensors"
_FORMAT = "surogate.dist.optimizer/1"


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def _metadata(dp: DataParallel) -> dict[str, str]:
    return {
        "format": _FORMAT,
        "world_size": str(dp.world.world_size),
        "zero": str(dp.zero),
        "group_sizes": json.dumps(list(dp.layout.group_sizes)),
        "buckets": json.dumps([b.numel for b in dp.layout.buckets]),
        "state": json.dumps(sorted(dp.state)),
    }


def save_state(dp: DataParallel, directory: Path, *, gathered: bool) -> None:
    world = dp.world
    directory.mkdir(parents=True, exist_ok=True)
    meta = _metadata(dp)
    if gathered:
        for name, t in sorted(dp.state.items()):
            if t.shape != dp.master.shape:
                raise DistError(
                    f"optimizer state {name!r} has shape {tuple(t.shape)}, not the master's {tuple(dp.master.shape)}:"
                    " only elementwise state can be gathered; save with gathered=False (one file per rank)"
                )
        tensors = {"master": dp.full_master(0)}
        for name, t in sorted(dp.state.items()):
            tensors[f"state.{name}"] = dp._to_canonical(t, 0)
        if world.is_main:
            save_file(tensors, directory / GATHERED_NAME, meta)
    else:
        meta["rank"] = str(world.rank)
        tensors = {"master": dp.master, **{f"state.{n}": t for n, t in sorted(dp.state.items())}}
        save_file(tensors, directory / rank_file_name(world.rank), meta)
    world.barrier()


def load_state(dp: DataParallel, directory: Path) -> None:
    gathered = directory / GATHERED_NAME
    if gathered.exists():
        _load_gathered(dp, gathered)
        return
    ranks = sorted(directory.glob("rank*.safetensors"))
    if not ranks:
        raise DistError(
            f"{directory} holds no optimizer state: expected {GATHERED_NAME} or rank<r>.safetensors "
            "(written by DataParallel.save_state)"
        )
    world = dp.world
    mine = directory / rank_file_name(world.rank)
    meta = _read_meta(mine if mine.exists() else ranks[0])
    saved_world = int(meta.get("world_size", -1))
    if saved_world != world.world_size or not mine.exists():
        raise DistError(
            f"{directory}: the optimizer state was saved per rank by {saved_world} ranks, this run has "
            f"{world.world_size}: resume with {saved_world} ranks (mpirun -n {saved_world}), or save gathered "
            f"checkpoints ({GATHERED_NAME}, loadable at any world size)"
        )
    if int(meta.get("zero", -1)) != dp.zero:
        raise DistError(
            f"{mine}: the optimizer state was saved at ZeRO level {meta.get('zero')}, this run uses {dp.zero}: "
            f"resume with zero_level {meta.get('zero')}, or save gathered checkpoints ({GATHERED_NAME})"
        )
    expected = _metadata(dp)
    for key in ("group_sizes", "buckets", "state"):
        if meta.get(key) != expected[key]:
            raise DistError(
                f"{mine}: the optimizer state was saved with {key} {meta.get(key)}, this run has {expected[key]} "
                "(a different model, LoRA config, bucket size or optimizer): resume with the same settings"
            )
    tensors = _read(mine)
    _copy(mine, tensors, "master", dp.master)
    for name, t in dp.state.items():
        _copy(mine, tensors, f"state.{name}", t)


def _load_gathered(dp: DataParallel, path: Path) -> None:
    tensors = _read(path)
    meta = _read_meta(path)
    sizes = json.dumps(list(dp.layout.group_sizes))
    if meta.get("group_sizes") != sizes:
        raise DistError(
            f"{path}: saved for parameter groups of sizes {meta.get('group_sizes')}, this model has {sizes} "
            "(a different model or LoRA config)"
        )
    expected = {"master", *(f"state.{n}" for n in dp.state)}
    if set(tensors) != expected:
        raise DistError(f"{path}: holds tensors {sorted(tensors)}, this optimizer needs {sorted(expected)}")
    dp._from_canonical(tensors["master"], dp.master)
    for name, t in dp.state.items():
        dp._from_canonical(tensors[f"state.{name}"], t)


def _read(path: Path):
    try:
        tensors, _ = load_file(path)
    except (OSError, ValueError) as exc:
        raise DistError(f"cannot read optimizer state {path}: {exc}") from None
    return tensors


def _read_meta(path: Path) -> dict[str, str]:
    try:
        meta = read_metadata(path)
    except (OSError, ValueError) as exc:
        raise DistError(f"cannot read optimizer state {path}: {exc}") from None
    if meta.get("format") != _FORMAT:
        raise DistError(f"{path} is not a surogate.dist optimizer checkpoint (format {meta.get('format')!r})")
    return meta


def _copy(path: Path, tensors: dict, key: str, dst) -> None:
    src = tensors.get(key)
    if src is None or src.shape != dst.shape:
        got = None if src is None else tuple(src.shape)
        raise DistError(f"{path}: tensor {key!r} has shape {got}, this run needs {tuple(dst.shape)}")
    dst.copy_(src)
