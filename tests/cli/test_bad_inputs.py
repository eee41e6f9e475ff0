"""Every bad input of issue 5 ends with exit code 2 and one paragraph naming the file or key (and the fix), never a
traceback. (Resume with an incompatible config: tests/integration/test_cli_resume.py.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import QUICKSTART, write_jsonl

from surogate.cli.app import main

CHAT = {"messages": [{"role": "user", "content": "Reverse the letters: abc"},
                     {"role": "assistant", "content": "cba"}]}


def _model_copy(tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(QUICKSTART / "model", dest)
    return dest


def _config(tmp_path, **overrides) -> Path:
    cfg = {"model": str(QUICKSTART / "model"), "output_dir": str(tmp_path / "out"),
           "datasets": [{"path": str(write_jsonl(tmp_path / "d.jsonl", [CHAT] * 4))}], "sequence_len": 64,
           "max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "lora": False,
           "validation_split_ratio": 0.0}
    cfg.update(overrides)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fails(capsys, argv, *expected) -> str:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err + captured.out
    err = captured.err
    assert err.startswith("surogate ") and "Traceback" not in err + captured.out
    for e in expected:
        assert str(e) in err, (e, err)
    return err


def test_missing_yaml(tmp_path, capsys):
    _fails(capsys, ["sft", tmp_path / "nope.yaml"], "nope.yaml", "config file not found")


def test_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndatasets: [\n")
    _fails(capsys, ["sft", bad], "bad.yaml", "invalid YAML at line")


def test_unknown_and_ill_typed_keys_reported_together(tmp_path, capsys):
    err = _fails(capsys, ["sft", _config(tmp_path, learning_rte=1.0, max_steps="many")],
                 "c.yaml", "2 config problems", "did you mean `learning_rate`", "max_steps: must be an int")
    assert err.count("\n  - ") == 2


def test_override_errors(tmp_path, capsys):
    _fails(capsys, ["sft", _config(tmp_path), "lora_rank=0"], "lora_rank: must be > 0")


def test_missing_model_folder(tmp_path, capsys):
    _fails(capsys, ["sft", _config(tmp_path, model=str(tmp_path / "nowhere"))], "model", "model folder not found")


def test_missing_model_weights(tmp_path, capsys):
    model = _model_copy(tmp_path)
    (model / "model.safetensors").unlink()
    _fails(capsys, ["sft", _config(tmp_path, model=str(model))], str(model), "safetensors")


def test_corrupt_safetensors(tmp_path, capsys):
    model = _model_copy(tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, ["sft", _config(tmp_path, model=str(model))], "model.safetensors")


def test_unsupported_architecture(tmp_path, capsys):
    model = _model_copy(tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["sft", _config(tmp_path, model=str(model))], "config.json", "GPT2LMHeadModel", "not supported")


def test_missing_tokenizer(tmp_path, capsys):
    model = _model_copy(tmp_path)
    (model / "tokenizer.json").unlink()
    _fails(capsys, ["sft", _config(tmp_path, model=str(model))], str(model), "tokenizer.json not found")


@pytest.mark.parametrize("case", ["missing", "empty", "wrong type"])
def test_bad_dataset_file(tmp_path, capsys, case):
    path = tmp_path / "data.jsonl"
    if case == "empty":
        path.write_text("")
    elif case == "wrong type":
        write_jsonl(path, [{"prompt": "a", "completion": "b"}] * 3)
    expected = {"missing": "dataset file not found", "empty": "the dataset is empty",
                "wrong type": "do not match type alpaca"}[case]
    _fails(capsys, ["sft", _config(tmp_path, datasets=[{"path": str(path), "type": "alpaca"}])], path, expected)


def test_every_row_filtered_out(tmp_path, capsys):
    _fails(capsys, ["sft", _config(tmp_path, sequence_len=16)], "d.jsonl", "every row was filtered out",
           "4 too long deleted", "raise sequence_len")


def test_tokenizer_without_chat_template(tmp_path, capsys):
    model = _model_copy(tmp_path)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    _fails(capsys, ["sft", _config(tmp_path, model=str(model))], "no chat template", "chat_template: chatml")


def test_output_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _fails(capsys, ["sft", _config(tmp_path, output_dir=str(blocker / "out"))], "output_dir", "cannot write")


def test_feature_not_supported_yet(tmp_path, capsys):
    _fails(capsys, ["sft", _config(tmp_path, offload_grads=True, recompute_lora=True)], "not supported yet",
           "offload_grads", "recompute_lora")


def test_exit_code_and_no_traceback_from_the_console_script(tmp_path):
    script = Path(sys.executable).parent / "surogate"
    out = subprocess.run([str(script), "sft", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert out.returncode == 2 and "config file not found" in out.stderr and "Traceback" not in out.stderr
