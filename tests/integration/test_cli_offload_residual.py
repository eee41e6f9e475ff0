"""offload_residual through `surogate sft` (CPU: the host-to-host copy path): with recompute_block the run logs exactly
the losses and grad norms of recompute_block alone; without recompute_block it is a config error naming the fix."""

import pytest
from cli_runs import metrics, run, write_config

from surogate.cli.config import check_supported, load_config
from surogate.models._offload import OffloadBuffers


@pytest.mark.parametrize("lora", [False, True])
def test_offload_residual_equals_recompute_block_alone(tmp_path, capsys, monkeypatch, lora):
    saves = []
    save = OffloadBuffers.save
    monkeypatch.setattr(OffloadBuffers, "save", lambda self, tensors: saves.append(1) or save(self, tensors))
    logs = []
    for offload in (False, True):
        folder = tmp_path / f"offload_{offload}"
        config = write_config(folder, output_dir=str(folder / "out"), recompute_block=True, offload_residual=offload,
                              lora=lora, lora_rank=4, lora_alpha=8, max_steps=3, eval_steps=0)
        code, _, err = run(["sft", config], capsys)
        assert code == 0, err
        logs.append([(r["loss"], r["grad_norm"]) for r in metrics(folder / "out")])
    assert len(logs[0]) == 3 and logs[0] == logs[1]
    assert len(saves) >= 3 * 2  # the offloading run went through the host buffers (2 layers, 3 steps at least)


def test_offload_residual_needs_recompute_block(tmp_path, capsys):
    config = write_config(tmp_path, offload_residual=True)
    code, _, err = run(["sft", config], capsys)
    assert code == 2 and "offload_residual" in err and "recompute_block: true" in err, err
    cfg = load_config(write_config(tmp_path, offload_residual=True, recompute_block=True))
    check_supported(cfg, device="cpu", model_options=frozenset({"offload_residual"}))  # accepted
