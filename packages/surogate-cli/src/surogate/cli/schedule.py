"""The learning-rate schedule (warmup, linear / cosine / wsd / constant, cooldown, final_lr_fraction).

The optimizer itself is surogate.cli.step.TrainStep (flat buffers, fused AdamW, clipping on the device).
"""

from __future__ import annotations

import math

from .config import Config


def lr_at(step: int, cfg: Config, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    warmup: base * (step + 1) / warmup;  then over the main phase (progress p from 0 to 1):
    linear base -> final, cosine final + (base - final) * (1 + cos(pi p)) / 2, wsd and constant stay at base;
    cooldown (last cooldown_steps): from the main phase's last value down to final as 1 - sqrt(progress).
    final = base * final_lr_fraction."""
    base = cfg.learning_rate
    final = base * cfg.final_lr_fraction
    warmup = warmup_steps(cfg, max_steps)
    cooldown = min(cfg.cooldown_steps, max(0, max_steps - warmup))
    main = max(0, max_steps - warmup - cooldown)
    if step < warmup:
        return base * (step + 1) / warmup
    if step < warmup + main:
        return _main_phase(cfg.lr_scheduler_type, base, final, (step - warmup) / max(1, main))
    start = _main_phase(cfg.lr_scheduler_type, base, final, 1.0) if main else base
    progress = (step - warmup - main + 1) / max(1, cooldown)
    return final + (start - final) * (1.0 - math.sqrt(min(1.0, progress)))


def warmup_steps(cfg: Config, max_steps: int) -> int:
    return cfg.warmup_steps or int(round(cfg.warmup_ratio * max_steps))


def _main_phase(kind: str, base: float, final: float, p: float) -> float:
    if kind == "linear":
        return base + (final - base) * p
    if kind == "cosine":
        return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * p))
    return base  # wsd, constant
