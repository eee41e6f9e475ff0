"""Tiny `surogate` runs on the quickstart model: a few steps of [2, 64] rows, small data copied into tmp_path."""

import json
from pathlib import Path

import yaml

from surogate.cli.app import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
MODEL = QUICKSTART / "model"


def write_data(folder: Path, n_train: int = 32, n_eval: int = 8) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train = (QUICKSTART / "data" / "train.jsonl").read_text().splitlines()[:n_train]
    evals = (QUICKSTART / "data" / "eval.jsonl").read_text().splitlines()[:n_eval]
    (folder / "train.jsonl").write_text("\n".join(train) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(evals) + "\n")
    return folder / "train.jsonl", folder / "eval.jsonl"


def write_config(tmp_path: Path, name: str = "run.yaml", **overrides) -> Path:
    train, evals = write_data(tmp_path / "data")
    cfg = {
        "model": str(MODEL),
        "output_dir": str(tmp_path / "out"),
        "datasets": [{"path": str(train), "type": "messages"}],
        "validation_datasets": [{"path": str(evals), "type": "messages"}],
        "sequence_len": 64,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "learning_rate": 3e-3,
        "warmup_steps": 1,
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.0,
        "logging_steps": 1,
        "eval_steps": 2,
        "save_steps": 0,
        "eval_exact_match_samples": 4,
        "eval_max_new_tokens": 6,
        "lora": False,
    }
    cfg.update(overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def metrics(output_dir: Path, kind: str = "step") -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
