"""Kill at step N and resume with a low-precision recipe: the recipe's state (fp8-hybrid's amax histories and delayed
scales of the inputs and the gradients, nvfp4's stochastic-rounding step) travels in the checkpoint
(recipe.safetensors), so the resumed run equals the uninterrupted one bit for bit on CPU (the recipes' exact emulation
path). Without that file the resumed fp8 run quantises with fresh scales and drifts: the control below shows the test
can fail."""

import pytest
import torch
from cli_runs import metrics, run, write_config
from safetensors.torch import load_file

from surogate.cli.train import INTERRUPT_ENV

RUN = dict(max_steps=5, save_steps=2, eval_steps=0, eval_exact_match_samples=0, gradient_accumulation_steps=2)


def _weights(out):
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("recipe", ["fp8-hybrid", "nvfp4"])
def test_recipe_resume_equals_uninterrupted(tmp_path, capsys, monkeypatch, recipe):
    straight = tmp_path / "straight"
    code, _, err = run(["sft", write_config(straight, recipe=recipe, **RUN)], capsys)
    assert code == 0, err

    killed = tmp_path / "killed"
    cfg = write_config(killed, recipe=recipe, **RUN)
    monkeypatch.setenv(INTERRUPT_ENV, "3")
    assert run(["sft", cfg], capsys)[0] == 130
    saved = killed / "out" / "checkpoints" / "step_00000002" / "recipe.safetensors"
    state = load_file(saved)
    if recipe == "fp8-hybrid":  # 8 quantised linears (2 layers x qkv, o, gate_up, down), history rolled twice
        assert state["amax_history"].shape == (1024, 8) and (state["amax_history"][1:3] > 0).all()
        assert (state["scale"] != 1).all()
        assert state["grad_amax_history"].shape == (1024, 8) and (state["grad_scale"] != 1).all()  # E5M2 dy
    else:
        assert int(state["seed_step"]) == 2
    monkeypatch.delenv(INTERRUPT_ENV)
    code, out, err = run(["sft", cfg, "resume_from_checkpoint=true"], capsys)
    assert code == 0 and "step_00000002 at step 2" in out, err

    a, b = metrics(straight / "out"), metrics(killed / "out")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    wa, wb = _weights(straight / "out"), _weights(killed / "out")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fp8_resume_without_the_recipe_state_drifts(tmp_path, capsys, monkeypatch):
    """The control: the same kill-and-resume with recipe.safetensors deleted restarts the scales at 1."""
    straight = tmp_path / "straight"
    assert run(["sft", write_config(straight, recipe="fp8-hybrid", **RUN)], capsys)[0] == 0
    killed = tmp_path / "killed"
    cfg = write_config(killed, recipe="fp8-hybrid", **RUN)
    monkeypatch.setenv(INTERRUPT_ENV, "3")
    assert run(["sft", cfg], capsys)[0] == 130
    (killed / "out" / "checkpoints" / "step_00000002" / "recipe.safetensors").unlink()
    monkeypatch.delenv(INTERRUPT_ENV)
    assert run(["sft", cfg, "resume_from_checkpoint=true"], capsys)[0] == 0
    a, b = metrics(straight / "out"), metrics(killed / "out")
    assert [r["loss"] for r in b][:2] == [r["loss"] for r in a][:2]
    assert [r["loss"] for r in b][2:] != [r["loss"] for r in a][2:]


def test_skip_quant_layers_and_fp8_keys_reach_the_recipe(tmp_path, capsys):
    """skip_quant_* / fp4_disable_2d_quantization / fp8_amax_history / fp8_margin build the run's Recipe (the
    start report names the BF16 layers; the checkpointed amax history has the asked length); more skipped layers
    than the model has is a user error naming the key (exit 2)."""
    out = tmp_path / "nvfp4"
    code, text, err = run(["sft", write_config(out, recipe="nvfp4", skip_quant_last_layers=1, max_steps=2,
                                               fp4_disable_2d_quantization=True, eval_steps=0,
                                               eval_exact_match_samples=0)], capsys)
    assert code == 0, err
    assert "last 1 layers in BF16" in text and "4 of 8 linear layers quantised" in text, text
    assert "1-D blocks for weights" in text, text
    code, text, err = run(["sft", write_config(tmp_path / "nvfp4-default", recipe="nvfp4", max_steps=1, eval_steps=0,
                                               eval_exact_match_samples=0)], capsys)
    assert code == 0 and "last 1 layers in BF16" in text, err  # nvfp4's default: 15% of the layers, at least 1
    code, text, err = run(["sft", write_config(tmp_path / "nvfp4-all", recipe="nvfp4", skip_quant_last_layers=0,
                                               max_steps=1, eval_steps=0, eval_exact_match_samples=0)], capsys)
    assert code == 0 and "8 of 8 linear layers quantised" in text and "layers in BF16" not in text, text
    out = tmp_path / "fp8"
    code, text, err = run(["sft", write_config(out, recipe="fp8-hybrid", fp8_amax_history=16, fp8_margin=1,
                                               max_steps=2, save_steps=1, eval_steps=0,
                                               eval_exact_match_samples=0)], capsys)
    assert code == 0, err
    state = load_file(out / "out" / "checkpoints" / "step_00000001" / "recipe.safetensors")
    assert state["amax_history"].shape == (16, 8)
    code, text, err = run(["sft", write_config(tmp_path / "bad", recipe="fp8-hybrid", skip_quant_first_layers=2,
                                               skip_quant_last_layers=1, max_steps=1)], capsys)
    assert code == 2 and "skip_quant_last_layers" in err and "Traceback" not in err, err


def test_nvfp4_keeps_fifteen_percent_of_the_last_layers_in_bf16_by_default():
    from surogate.cli.train import nvfp4_bf16_last_layers

    assert [nvfp4_bf16_last_layers(n) for n in (1, 2, 16, 28, 36, 80)] == [1, 1, 2, 4, 5, 12]
