"""`surogate pt config.yaml [key=value ...]`: pre-training / continued pre-training on raw text (every token
trained; datasets default to type text and lora to false). The loop is in train.py."""

from __future__ import annotations


def run(args) -> int:
    from .train import run as train_run

    return train_run(args, "pt")
