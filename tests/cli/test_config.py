"""The YAML config: defaults, every problem reported at once with key paths, suggestions, ${ENV}, overrides."""

import pytest
import yaml

from surogate.cli.config import Config, check_supported, describe_keys, load_config, write_resolved
from surogate.cli.errors import ConfigError, NotSupportedYet


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_minimal_config_gets_every_default(tmp_path):
    cfg = load_config(_write(tmp_path, "model: m\ndatasets: [{path: d.jsonl}]\n"))
    assert cfg.model == "m" and cfg.datasets[0].path == "d.jsonl" and cfg.datasets[0].type == "auto"
    assert cfg.learning_rate == 2e-4 and cfg.lora is True and cfg.lora_target_modules == "all-linear"
    assert cfg.lr_scheduler_type == "linear" and cfg.max_steps == -1


def test_every_field_has_a_default_and_a_doc():
    for name, _, doc in describe_keys(Config):
        assert doc, name


def test_all_problems_reported_at_once_with_paths_and_suggestions(tmp_path):
    text = """
model: m
lora_rnak: 8
learning_rate: fast
lr_scheduler_type: cosin
datasets:
  - path: a.jsonl
    typ: alpaca
  - path: b.jsonl
    samples: -3
warmup_steps: 10
warmup_ratio: 0.1
"""
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    problems = e.value.problems
    assert "lora_rnak: unknown key; did you mean `lora_rank`?" in problems
    assert any(p.startswith("learning_rate: must be a number") for p in problems)
    assert any("lr_scheduler_type" in p and "did you mean `cosine`" in p for p in problems)
    assert "datasets[0].typ: unknown key; did you mean `type`?" in problems
    assert any(p.startswith("datasets[1].samples: must be > 0") for p in problems)
    assert any(p.startswith("warmup_ratio: give warmup_steps or warmup_ratio") for p in problems)
    assert len(problems) == 6
    assert "c.yaml" in str(e.value)


def test_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "learning_rate: 1.0e-4\n"))
    assert any(p.startswith("model: is required") for p in e.value.problems)
    assert any(p.startswith("datasets: at least one") for p in e.value.problems)


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "model: m\ndatasets: [\n  {path: a\nlr: 1\n"))
    assert "invalid YAML at line" in str(e.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_yaml_1e_minus_4_is_a_number(tmp_path):
    cfg = load_config(_write(tmp_path, "model: m\ndatasets: [{path: d}]\nlearning_rate: 1e-4\n"))
    assert cfg.learning_rate == pytest.approx(1e-4)


def test_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("SUROGATE_TEST_MODEL", "/models/x")
    monkeypatch.setenv("SUROGATE_TEST_RANK", "8")
    monkeypatch.delenv("SUROGATE_TEST_UNSET", raising=False)
    cfg = load_config(_write(tmp_path, "model: ${SUROGATE_TEST_MODEL}\ndatasets: [{path: d}]\n"
                                       "lora_rank: ${SUROGATE_TEST_RANK}\n"
                                       "output_dir: out/${SUROGATE_TEST_UNSET:-default}\n"))
    assert cfg.model == "/models/x" and cfg.lora_rank == 8 and cfg.output_dir == "out/default"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "model: ${SUROGATE_TEST_UNSET}\ndatasets: [{path: d}]\n"))
    assert any("model: environment variable SUROGATE_TEST_UNSET is not set" in p for p in e.value.problems)


def test_overrides(tmp_path):
    path = _write(tmp_path, "model: m\ndatasets: [{path: a}, {path: b}]\n")
    cfg = load_config(path, ["learning_rate=1e-3", "lora=false", "datasets.1.type=text", "report_to=[tensorboard]",
                             "validation_datasets.0.path=v.jsonl"])
    assert cfg.learning_rate == 1e-3 and cfg.lora is False and cfg.datasets[1].type == "text"
    assert cfg.report_to == ["tensorboard"] and cfg.validation_datasets[0].path == "v.jsonl"
    with pytest.raises(ConfigError) as e:
        load_config(path, ["lora_rank=big", "nonsense", "datasets.5.path=x"])
    assert len(e.value.problems) == 3


def test_ill_typed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "model: m\ndatasets: {path: a}\nlora: yes please\nsequence_len: 1.5\n"
                                     "lora_target_modules: [q_proj, qproj]\n"))
    p = e.value.problems
    assert any(x.startswith("datasets: must be a list") for x in p)
    assert any(x.startswith("lora: must be true or false") for x in p)
    assert any(x.startswith("sequence_len: must be an int") for x in p)
    assert any("lora_target_modules[1]" in x and "did you mean `q_proj`" in x for x in p)


def test_pt_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "model: m\ndatasets: [{path: a.txt}]\n"), command="pt")
    assert cfg.lora is False and cfg.datasets[0].type == "text"
    with pytest.raises(ConfigError, match="surogate pt"):
        load_config(_write(tmp_path, "model: m\ndatasets: [{path: a, type: alpaca}]\n"), command="pt")


def test_relative_paths_resolve_from_the_yaml_folder_then_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("{}\n")
    (tmp_path / "e.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(tmp_path / "sub", "model: model\ndatasets: [{path: d.jsonl}, {path: e.jsonl}]\n"))
    assert cfg.model == str(tmp_path / "sub" / "model")
    assert cfg.datasets[0].path == str(tmp_path / "sub" / "d.jsonl")
    assert cfg.datasets[1].path == "e.jsonl"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, "model: m\ndatasets: [{path: d, type: alpaca}]\nlora_rank: 4\n"))
    out = write_resolved(cfg, tmp_path)
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["lora_rank"] == 4


def test_not_supported_yet_is_an_error_not_a_fallback(tmp_path):
    cfg = load_config(_write(tmp_path, "model: m\ndatasets: [{path: d}]\nrecipe: nvfp4\nqlora_fp8: true\n"))
    with pytest.raises(NotSupportedYet) as e:
        check_supported(cfg, device="cpu")
    assert "recipe: nvfp4" in str(e.value) and "qlora_fp8" in str(e.value)
    check_supported(load_config(_write(tmp_path, "model: m\ndatasets: [{path: d}]\n")), device="cpu")
    check_supported(cfg, device="cpu", model_options=frozenset({"recipe", "qlora"}))  # a models version that has them
