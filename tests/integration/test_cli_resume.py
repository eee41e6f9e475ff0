"""Kill at step N, resume: the same losses and the same final weights as an uninterrupted run (bitwise, on CPU).
A checkpoint write that was cut short is ignored; a resume with an incompatible config is refused (exit 2)."""

import pytest
import torch
from cli_runs import metrics, run, write_config
from safetensors.torch import load_file

from surogate.cli.train import INTERRUPT_ENV

# LoRA with dropout: the resumed run must also restore the RNG to draw the same dropout masks
RUN = dict(lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.1, max_steps=6, save_steps=2, eval_steps=3,
           eval_exact_match_samples=0, gradient_accumulation_steps=3)


def test_resume_equals_uninterrupted(tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    code, _, err = run(["sft", write_config(straight, **RUN)], capsys)
    assert code == 0, err

    killed = tmp_path / "killed"
    cfg = write_config(killed, **RUN)
    monkeypatch.setenv(INTERRUPT_ENV, "3")
    code, out, _ = run(["sft", cfg], capsys)
    assert code == 130 and "interrupted after step 3" in out and "step_00000002" in out
    assert not (killed / "out" / "adapter").exists()  # nothing final written by an interrupted run
    # a checkpoint whose writing was cut short: a temporary folder next to the complete one
    partial = killed / "out" / "checkpoints" / ".tmp-step_00000004-12345"
    partial.mkdir()
    (partial / "optimizer.safetensors").write_bytes(b"half")
    monkeypatch.delenv(INTERRUPT_ENV)

    code, out, err = run(["sft", cfg, "resume_from_checkpoint=true"], capsys)
    assert code == 0, err
    assert "resumed from" in out and "step_00000002 at step 2" in out
    assert not partial.exists()

    a, b = metrics(straight / "out"), metrics(killed / "out")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    assert [r["eval_loss"] for r in metrics(killed / "out", "eval")] == [
        r["eval_loss"] for r in metrics(straight / "out", "eval")]
    wa = load_file(straight / "out" / "adapter" / "adapter_model.safetensors")
    wb = load_file(killed / "out" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("change,named", [(["lora_rank=8"], "lora_rank was 4"),
                                          (["gradient_accumulation_steps=2"], "gradient_accumulation_steps was 3")])
def test_resume_with_an_incompatible_config_is_refused(tmp_path, capsys, monkeypatch, change, named):
    cfg = write_config(tmp_path, **{**RUN, "max_steps": 3})
    monkeypatch.setenv(INTERRUPT_ENV, "2")
    assert run(["sft", cfg], capsys)[0] == 130
    monkeypatch.delenv(INTERRUPT_ENV)
    code, out, err = run(["sft", cfg, "resume_from_checkpoint=true", *change], capsys)
    assert code == 2 and named in err and "step_00000002" in err and "Traceback" not in err + out
    # and starting afresh on top of the old checkpoints is refused too: nothing of the earlier run is mixed in
    code, _, err = run(["sft", cfg], capsys)
    assert code == 2 and "resume_from_checkpoint: true" in err
