"""surogate.cli.data: from dataset files to memory-mapped packed rows.

prepare(cfg, tokenizer, command) loads every dataset, holds out the validation split (seeded), converts rows by type,
tokenises (assistant-only labels for chats), counts what it has to skip (empty, malformed, too long: reported with
file and row, never dropped silently), shuffles documents (seeded), packs them into sequence_len rows and writes
output_dir/tokenized/{train,eval}.tok. A later run with the same config, data files and tokenizer reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np

from ..config import Config, DatasetConfig, validation_split_ratio
from ..errors import DataError
from . import shards
from .chat import TemplateRenderError
from .formats import Chat, RowError, Text, resolve_type, to_example
from .packing import IGNORE, pack, split_long_text
from .shards import Shard, open_shard
from .sources import fingerprint, load_rows
from .tokenizer import Tokenizer

__all__ = ["IGNORE", "PreparedData", "Shard", "Tokenizer", "prepare", "tokenized_dir"]

_EXAMPLES_KEPT = 3  # problem examples shown per kind and dataset
_EVAL_PROMPTS_KEPT = 10_000


@attrs.define
class PreparedData:
    train: Shard
    eval: Shard | None
    eval_prompts: list[dict]  # {"messages": [...], "answer": str} from validation chats
    reports: list[dict]
    reused: bool


@attrs.define
class _Report:
    """What happened to one dataset's rows."""

    path: str
    type: str = ""
    rows: int = 0
    train_docs: int = 0
    eval_docs: int = 0
    counts: dict = attrs.field(factory=dict)  # empty / malformed / too_long_deleted / truncated / split_pieces
    examples: dict = attrs.field(factory=dict)  # kind -> ["origin: reason", ...]

    def note(self, kind: str, origin: str, reason: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < _EXAMPLES_KEPT:
            shown.append(f"{origin}: {reason}")


def tokenized_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "tokenized"


def _effective_type(ds: DatasetConfig, command: str | None) -> str:
    return "text" if command == "pt" and ds.type == "auto" else ds.type


def data_hash(cfg: Config, tokenizer: Tokenizer, command: str | None) -> str:
    """What the tokenized rows depend on: dataset entries and file contents, tokenizer files, packing keys."""
    payload = {
        "format": shards.VERSION,
        "sequence_len": cfg.sequence_len,
        "seed": cfg.seed,
        "validation_split_ratio": validation_split_ratio(cfg),
        "chat_template": cfg.chat_template,
        "truncation_strategy": cfg.truncation_strategy,
        "tokenizer": [hashlib.sha256(p.read_bytes()).hexdigest() for p in tokenizer.fingerprint_files()],
    }
    for group in ("datasets", "validation_datasets"):
        payload[group] = [{**attrs.asdict(d), "type": _effective_type(d, command), "content": fingerprint(d)}
                          for d in getattr(cfg, group)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def prepare(cfg: Config, tokenizer: Tokenizer, command: str | None, log: Callable[[str], None] = print
            ) -> PreparedData:
    out = tokenized_dir(cfg)
    digest = data_hash(cfg, tokenizer, command)
    reused = _try_reuse(out, digest)
    if reused is not None:
        log(f"data: reusing {out} (config, data and tokenizer unchanged)")
        return reused

    train_docs, eval_docs, prompts, reports = [], [], [], []
    ratio = validation_split_ratio(cfg)
    for ds in cfg.datasets:
        report = _Report(ds.path)
        t, e, p = _tokenize_dataset(ds, cfg, tokenizer, command, report, split_ratio=ratio, validation=False)
        train_docs += t
        eval_docs += e
        prompts += p
        reports.append(report)
    for ds in cfg.validation_datasets:
        report = _Report(ds.path)
        t, _, p = _tokenize_dataset(ds, cfg, tokenizer, command, report, split_ratio=0.0, validation=True)
        report.eval_docs, report.train_docs = report.train_docs, 0
        eval_docs += t
        prompts += p
        reports.append(report)
    for r in reports:
        log(_report_line(r))

    # Seeded shuffle of documents before packing: the rows mix datasets; the per-epoch row order is the loader's.
    order = np.random.default_rng(cfg.seed).permutation(len(train_docs))
    train_docs = [train_docs[i] for i in order]
    out.mkdir(parents=True, exist_ok=True)
    train_ids, train_labels, train_pos, train_stats = pack(train_docs, cfg.sequence_len, tokenizer.pad_id)
    if train_stats["trained_tokens"] == 0:
        raise DataError("no token of the training data is trained on (every label is masked)",
                        file=cfg.datasets[0].path, fix="check the dataset type and that rows have assistant turns")
    stats = {"datasets": [attrs.asdict(r) for r in reports], "train": train_stats}
    eval_shard_path = out / "eval.tok"
    if eval_docs:
        e_ids, e_labels, e_pos, eval_stats = pack(eval_docs, cfg.sequence_len, tokenizer.pad_id)
        stats["eval"] = eval_stats
        shards.write_shard(eval_shard_path, e_ids, e_labels, e_pos, hash=digest, vocab_size=tokenizer.vocab_size,
                           stats={"eval": eval_stats})
    elif eval_shard_path.exists():
        eval_shard_path.unlink()
    _write_jsonl(out / "eval_prompts.jsonl", prompts[:_EVAL_PROMPTS_KEPT])
    # train.tok last: its header's hash is what a later run checks, so it marks the whole folder complete
    shards.write_shard(out / "train.tok", train_ids, train_labels, train_pos, hash=digest,
                       vocab_size=tokenizer.vocab_size, stats=stats)
    log(_packing_line("train", train_stats, cfg.sequence_len)
        + (("; " + _packing_line("eval", stats["eval"], cfg.sequence_len)) if eval_docs else "; no eval rows"))
    return PreparedData(open_shard(out / "train.tok"), open_shard(eval_shard_path) if eval_docs else None,
                        prompts[:_EVAL_PROMPTS_KEPT], stats["datasets"], reused=False)


def _try_reuse(out: Path, digest: str) -> PreparedData | None:
    header = shards.read_header(out / "train.tok")
    if header is None or header.get("hash") != digest or not (out / "eval_prompts.jsonl").is_file():
        return None
    has_eval = "eval" in header["stats"]
    eval_header = shards.read_header(out / "eval.tok") if has_eval else None
    if has_eval and (eval_header is None or eval_header.get("hash") != digest):
        return None
    prompts = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    return PreparedData(open_shard(out / "train.tok"), open_shard(out / "eval.tok") if has_eval else None, prompts,
                        header["stats"].get("datasets", []), reused=True)


def _tokenize_dataset(ds: DatasetConfig, cfg: Config, tokenizer: Tokenizer, command: str | None, report: _Report,
                      split_ratio: float, validation: bool) -> tuple[list, list, list]:
    """-> (train documents, held-out documents, generation prompts from held-out / validation chats)."""
    rows, bad = load_rows(ds)
    report.rows = len(rows) + len(bad)
    for b in bad:
        report.note(b.kind, b.origin, b.reason)
    kind = resolve_type(ds, rows[0].data if rows else None, command) if rows else ds.type
    report.type = kind
    if kind != "text" and rows:
        tokenizer.require_template(ds.path)

    # seeded split of rows (before conversion: the split does not move when filtering rules change)
    n_eval = int(round(len(rows) * split_ratio)) if split_ratio > 0 else 0
    is_eval = np.zeros(len(rows), dtype=bool)
    if n_eval:
        is_eval[np.random.default_rng(cfg.seed).permutation(len(rows))[:n_eval]] = True

    seq = cfg.sequence_len
    train, evaluation, prompts = [], [], []
    for row, held_out in zip(rows, is_eval, strict=True):
        try:
            example = to_example(row.data, ds, kind)
            if isinstance(example, Text):
                ids, trained = tokenizer.encode_text(example.text)
            else:
                ids, trained = tokenizer.encode_chat(example.messages)
        except RowError as e:
            report.note(e.kind, row.origin, e.reason)
            continue
        except TemplateRenderError as e:
            report.note("malformed", row.origin, str(e))
            continue
        if len(ids) > seq:
            if isinstance(example, Text):
                pieces = split_long_text(ids, trained, seq)
                report.counts["split_pieces"] = report.counts.get("split_pieces", 0) + len(pieces)
            elif cfg.truncation_strategy == "truncate":
                report.note("truncated", row.origin, f"{len(ids)} tokens > sequence_len {seq}")
                pieces = [(ids[:seq], trained[:seq])]
            else:
                report.note("too_long_deleted", row.origin, f"{len(ids)} tokens > sequence_len {seq}")
                continue
        else:
            pieces = [(ids, trained)]
        (evaluation if held_out else train).extend(pieces)
        if (held_out or validation) and isinstance(example, Chat) and example.messages[-1]["role"] == "assistant":
            prompts.append({"messages": example.messages[:-1], "answer": example.messages[-1]["content"]})
    report.train_docs, report.eval_docs = len(train), len(evaluation)
    if not train and not evaluation:
        raise DataError(_all_filtered_message(report, rows, kind), file=ds.path,
                        fix="check `type` and the field names (instruction_field, output_field, messages_field, "
                            "text_field, ...) against the rows, or raise sequence_len")
    return train, evaluation, prompts


def _all_filtered_message(report: _Report, rows, kind: str) -> str:
    parts = []
    for k, n in report.counts.items():
        parts.append(f"{n} {k.replace('_', ' ')} (e.g. {report.examples.get(k, ['?'])[0]})")
    keys = sorted(rows[0].data) if rows and isinstance(rows[0].data, dict) else None
    match = ""
    if set(report.counts) == {"malformed"} and keys is not None:
        match = f"; the rows do not match type {kind}: their keys are {keys}"
    return f"every row was filtered out: {'; '.join(parts)}{match}"


def _report_line(r: _Report) -> str:
    line = f"data: {r.path} ({r.type}): {r.rows} rows -> {r.train_docs} train + {r.eval_docs} eval documents"
    if r.counts:
        skipped = []
        for k, n in r.counts.items():
            example = f" (first: {r.examples[k][0]})" if r.examples.get(k) else ""
            skipped.append(f"{n} {k.replace('_', ' ')}{example}")
        line += "; " + "; ".join(skipped)
    return line


def _packing_line(name: str, s: dict, seq: int) -> str:
    fill = 100.0 * s["tokens"] / max(1, s["rows"] * seq)
    return (f"{name}: {s['rows']} rows of {seq} tokens, {s['tokens']} tokens ({fill:.0f}% filled), "
            f"{s['trained_tokens']} trained")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
