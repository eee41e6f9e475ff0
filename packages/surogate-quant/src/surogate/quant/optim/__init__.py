"""Optimizers with quantised states."""

from .adamw8bit import AdamW8bit, AdamW8bitState, adamw8bit_step

__all__ = ["AdamW8bit", "AdamW8bitState", "adamw8bit_step"]
