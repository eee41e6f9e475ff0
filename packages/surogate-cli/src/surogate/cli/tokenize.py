"""`surogate tokenize config.yaml [--debug] [--rows N]`: tokenise and pack the config's datasets into
output_dir/tokenized/ (what sft / pt would do first, reused by them) and print what was kept and skipped.

--debug shows the first rows token by token: trained tokens (targets of the loss) in green, masked tokens (the
prompt, the template) in grey, padding in red (as `·`); a `|` marks where a packed document starts. Without a
colour terminal, trained runs are bracketed: [[...]].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import load_config

STYLES = {"trained": "bold green", "masked": "grey50", "padding": "red"}


def run(args) -> int:
    from rich.console import Console

    from .data import prepare
    from .data.tokenizer import Tokenizer
    from .train import _prepare_output_dir

    cfg = load_config(args.config, args.overrides, command="tokenize")
    console = Console(highlight=False, soft_wrap=True)
    _prepare_output_dir(cfg)
    tokenizer = Tokenizer(cfg.model, cfg.chat_template)
    data = prepare(cfg, tokenizer, "tokenize", log=lambda s: console.print(s, markup=False))
    console.print(f"tokenized data in {Path(cfg.output_dir) / 'tokenized'}", markup=False)
    if args.debug:
        for r in range(min(args.rows, data.train.n_rows)):
            show_row(console, tokenizer, data.train, r)
    return 0


def classify_row(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, pad_id: int) -> list[str]:
    """'trained' | 'masked' | 'padding' per position. Token t is trained when it is the target of position t-1
    (labels are shifted: labels[t-1] == input_ids[t]) within the same document; padding is the row's tail run of
    pad tokens that has no targets."""
    n = len(input_ids)
    kinds = ["masked"] * n
    for t in range(1, n):
        if position_ids[t] != 0 and labels[t - 1] != -100:
            kinds[t] = "trained"
    starts = np.flatnonzero(position_ids == 0)
    last = int(starts[-1]) if len(starts) else 0
    if np.all(input_ids[last:] == pad_id) and np.all(labels[last:] == -100):
        for t in range(last, n):
            kinds[t] = "padding"
    return kinds


def show_row(console, tokenizer, shard, r: int) -> None:
    from rich.text import Text

    ids = np.asarray(shard.input_ids[r])
    labels = np.asarray(shard.labels[r])
    pos = np.asarray(shard.position_ids[r])
    kinds = classify_row(ids, labels, pos, tokenizer.pad_id)
    plain = not console.is_terminal  # no colours (a pipe, a file): trained runs are bracketed as [[...]]
    text = Text()
    previous = None
    for t, (tok, kind) in enumerate(zip(ids, kinds, strict=True)):
        if plain and previous == "trained" and kind != "trained":
            text.append("]]")
        if pos[t] == 0 and kind != "padding":
            text.append("|", style="bold magenta")
        if plain and kind == "trained" and previous != "trained":
            text.append("[[")
        piece = "·" if kind == "padding" else tokenizer.decode([int(tok)])
        text.append(piece.replace("\n", "\\n\n"), style=STYLES[kind])
        previous = kind
    if plain and previous == "trained":
        text.append("]]")
    n_pad = kinds.count("padding")
    n_trained = kinds.count("trained")
    length = len(ids) - n_pad
    console.rule(f"row {r}: {length} tokens, {n_trained} trained ({100 * n_trained / max(1, length):.0f}%), "
                 f"{n_pad} padding")
    console.print(text)
    legend = Text()
    for kind, style in STYLES.items():
        legend.append(f" {kind} ", style=style)
    console.print(legend)
