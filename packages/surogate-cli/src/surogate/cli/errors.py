"""The CLI's exceptions: one small hierarchy. `surogate.cli.app.main` turns any of them into a one-paragraph message on
stderr and exit code 2, never a traceback.

A message names the thing (file, key path, row) and the fix:

    UserError("must be a positive int, got -1", file="sft.yaml", key="lora_rank", fix="set lora_rank: 16")
    -> "sft.yaml: lora_rank: must be a positive int, got -1. Fix: set lora_rank: 16"
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, model folder, output folder). Carries where it is and how to fix it."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None, row: int | None = None,
                 fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.key = key
        self.row = row
        self.fix = fix

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file + (f" row {self.row}" if self.row is not None else ""))
        elif self.row is not None:
            where.append(f"row {self.row}")
        if self.key:
            where.append(self.key)
        text = ": ".join([*where, self.message])
        if self.fix:
            text = text.rstrip(".") + f". Fix: {self.fix}"
        return text


class ConfigError(UserError):
    """The YAML config (or a key=value override) is invalid. `problems` holds every problem found, reported at once."""

    def __init__(self, problems: list[str], *, file: str | None = None):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{len(self.problems)} config {noun}:\n{lines}", file=file)


class DataError(UserError):
    """A dataset is missing, empty, does not match its type, or every row of it was filtered out."""


class CheckpointError(UserError):
    """A checkpoint cannot be resumed from: missing, incomplete, or made with an incompatible config."""


class NotSupportedYet(UserError):
    """A config value names a feature that this version of Surogate does not implement yet."""
