"""`surogate sft config.yaml [key=value ...]`: supervised fine-tuning (full or LoRA) on chat / instruction data,
loss on the assistant turns only. The loop is in train.py."""

from __future__ import annotations


def run(args) -> int:
    from .train import run as train_run

    return train_run(args, "sft")
