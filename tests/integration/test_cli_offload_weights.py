"""offload_weights through `surogate sft` (CPU: the host-to-host copy path): a LoRA run with the frozen base weights
streamed from host memory logs exactly the losses and grad norms of the same run with them in place, and says where
they are; without LoRA (or with QLoRA, another recipe, ZeRO-3) it is a config error naming the key."""

import pytest
from cli_runs import metrics, run, write_config

from surogate.models._host_weights import HostWeights


def test_offload_weights_equals_weights_in_place(tmp_path, capsys, monkeypatch):
    fetched = []
    fetch = HostWeights._fetch
    monkeypatch.setattr(HostWeights, "_fetch", lambda self, layer: fetched.append(layer) or fetch(self, layer))
    logs = []
    for offload in (False, True):
        folder = tmp_path / f"offload_{offload}"
        config = write_config(folder, output_dir=str(folder / "out"), offload_weights=offload, lora=True,
                              lora_rank=4, lora_alpha=8, max_steps=3, eval_steps=0)
        code, text, err = run(["sft", config], capsys)
        assert code == 0, err
        logs.append([(r["loss"], r["grad_norm"]) for r in metrics(folder / "out")])
    assert len(logs[0]) == 3 and logs[0] == logs[1]
    assert "in host memory (offload_weights" in text, text
    assert len(fetched) >= 3 * 2  # the streaming run went through the ring (2 layers, 3 steps at least)


@pytest.mark.parametrize("keys", [dict(lora=False), dict(lora=True, qlora_bnb=True),
                                  dict(lora=True, recipe="fp8-hybrid"), dict(lora=True, zero_level=3)],
                         ids=["full", "qlora", "fp8", "zero3"])
def test_offload_weights_needs_plain_lora(tmp_path, capsys, keys):
    code, _, err = run(["sft", write_config(tmp_path, offload_weights=True, **keys)], capsys)
    assert code == 2 and "offload_weights" in err and "Traceback" not in err, err
