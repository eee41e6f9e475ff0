"""Short quickstart runs of every recipe, QLoRA mode and 8-bit AdamW track BF16 (tools/quant_curves.py, CPU).

Every mode has a CPU path (fp8-hybrid and nvfp4: exact emulation of the quantised GEMMs; QLoRA: the reference
quantisers), so all run here: 20 optimizer steps of [2, 64] rows, the same rows in the same order for every mode.
The stated margin (tools/quant_curves.py): mean loss of the last 5 steps <= the BF16 reference's + max(0.05 nats,
5%). A mode whose curve is bit-identical to its reference fails too (the setting did nothing), so a recipe that
silently falls back to BF16 is caught; the references must have learned (the runs are not flat).
This is the early phase only: over the quickstart's 800 steps (benchmarks/quant_curves_summary.csv, CPU) nvfp4 with
every layer quantised plateaus at ~0.23 while bf16 reaches 0.001 (the tool reports it as a known limitation);
nvfp4 with the last layer in BF16, as the reference Surogate runs it, passes there too."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import quant_curves  # noqa: E402

COMMON = ["sequence_len=64", "per_device_train_batch_size=2", "logging_steps=100"]
TAIL = 5


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    results, device = quant_curves.run_curves(tmp_path_factory.mktemp("curves"), steps=20, lora_steps=20,
                                              base_steps=20, common=COMMON)
    assert device == "cpu"
    return {row["mode"]: row for row in quant_curves.summarize(results, TAIL)}


def test_references_learn(summary):
    full, lora = summary["bf16"], summary["lora-bf16"]
    assert full["final_loss"] < full["first_loss"] - 1.5  # 5.6 -> ~3 in 20 steps of full fine-tuning
    assert lora["final_loss"] < 4.5


@pytest.mark.parametrize("mode", ["fp8-hybrid", "nvfp4", "qlora_fp8", "qlora_fp4", "qlora_bnb", "adamw_8bit"])
def test_mode_tracks_bf16(summary, mode):
    row = summary[mode]
    if mode == "adamw_8bit" and row["status"] == "skipped":
        pytest.skip(row["note"])
    assert row["status"] == "pass", row
    assert abs(row["delta"]) <= row["margin"]  # two-sided here: a mode far below BF16 would be as suspicious


def test_margin_and_identical_curves_fail():
    """The check itself: over the margin fails, a curve identical to the reference fails, under it passes."""
    mk = quant_curves.Mode
    ref = quant_curves.Result(mk("bf16", "full", reference=True), [3.0, 2.0, 1.0], [0.0] * 3, 0.0)
    same = quant_curves.Result(mk("fp8-hybrid", "full"), [3.0, 2.0, 1.0], [0.0] * 3, 0.0)
    near = quant_curves.Result(mk("nvfp4", "full"), [3.0, 2.0, 1.04], [0.0] * 3, 0.0)
    far = quant_curves.Result(mk("adamw_8bit", "full"), [3.0, 2.0, 1.06], [0.0] * 3, 0.0)
    known = quant_curves.Result(mk("nvfp4-all-layers", "full", known="stalls"), [3.0, 2.0, 1.5], [0.0] * 3, 0.0)
    rows = {r["mode"]: r for r in quant_curves.summarize([ref, same, near, far, known], tail=1)}
    assert rows["nvfp4-all-layers"]["status"] == "known" and rows["nvfp4-all-layers"]["note"] == "stalls"
    assert rows["bf16"]["status"] == "pass" and rows["nvfp4"]["status"] == "pass"
    assert rows["fp8-hybrid"]["status"] == "FAIL" and "identical" in rows["fp8-hybrid"]["note"]
    assert rows["adamw_8bit"]["status"] == "FAIL"
