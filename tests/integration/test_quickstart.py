"""The embedded quickstart (README's first command): it learns, visibly, on a CPU."""

import pytest
from cli_runs import QUICKSTART, metrics, run


@pytest.mark.slow
def test_quickstart_sft_learns_to_reverse_words(tmp_path, capsys):
    code, out, err = run(["sft", QUICKSTART / "sft.yaml", f"output_dir={tmp_path / 'out'}"], capsys)
    assert code == 0, err
    steps = metrics(tmp_path / "out")
    assert len(steps) == 800 and steps[0]["loss"] > 5.0 and steps[-1]["loss"] < 0.05
    (final,) = metrics(tmp_path / "out", "final")
    assert final["eval_loss"] < 0.1 and final["exact_match"] >= 0.9, final
    assert "exact match:" in out and (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_quickstart_pt_trains_on_raw_text(tmp_path, capsys):
    code, out, err = run(["pt", QUICKSTART / "pt.yaml", f"output_dir={tmp_path / 'out'}", "max_steps=20",
                          "save_steps=10", "eval_steps=10", "logging_steps=10"], capsys)
    assert code == 0, err
    steps = metrics(tmp_path / "out")
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert [r["step"] for r in metrics(tmp_path / "out", "eval")] == [10, 20]
    assert (tmp_path / "out" / "checkpoints" / "step_00000010" / "state.json").is_file()
