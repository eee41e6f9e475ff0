"""surogate.cli: the `surogate` command (sft, pt, tokenize, merge)."""

from .__about__ import __version__

__all__ = ["__version__"]
