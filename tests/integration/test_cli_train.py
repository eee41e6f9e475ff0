"""`surogate sft` (full and LoRA), `pt`, `merge` and `tokenize --debug` end to end on the quickstart model (CPU).
What they write is checked against transformers + peft (test-only dependencies)."""

import numpy as np
import pytest
import torch
from cli_runs import MODEL, metrics, run, write_config
from safetensors.torch import load_file

from surogate.models import load_pretrained

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[256, 5, 17, 40, 41, 42, 257, 3, 99, 12, 200, 7]])


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_sft_full_writes_a_hf_folder_metrics_plot_and_eval(tmp_path, capsys):
    code, out, err = run(["sft", write_config(tmp_path)], capsys)
    assert code == 0, err
    folder = tmp_path / "out"
    steps = metrics(folder)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5  # lr 3e-3 on a random model: the loss falls fast
    assert all(np.isfinite(r["grad_norm"]) and r["tok_per_s"] > 0 and r["mem_gb"] > 0 for r in steps)
    assert [r["step"] for r in metrics(folder, "eval")] == [2, 4]
    (final,) = metrics(folder, "final")
    assert 0.0 <= final["exact_match"] <= 1.0 and np.isfinite(final["eval_loss"])
    assert "step      4/4 [epoch 1" in out and "exact match:" in out
    assert (folder / "training_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "lora: false" in (folder / "resolved_config.yaml").read_text()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / "model" / f).is_file(), f
    # the saved folder is a Hugging Face model: transformers reads it and agrees with surogate
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    ours = load_pretrained(folder / "model", dtype=torch.float32)
    with torch.no_grad():
        assert _rel(ours(TOKENS).float(), _hf_logits(hf)) < 1e-4
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    assert _rel(_hf_logits(hf), _hf_logits(base)) > 1e-2  # it was trained


def test_sft_lora_adapter_loads_in_peft_and_merges(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    code, _, err = run(["sft", write_config(tmp_path, lora=True, lora_rank=4, lora_alpha=8,
                                            lora_target_modules=["q_proj", "v_proj", "down_proj"])], capsys)
    assert code == 0, err
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.json").is_file()
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in tensors.items())  # B moved off its zero init

    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, adapter)
    ours = load_pretrained(MODEL, dtype=torch.float32)
    ours.load_adapter(adapter)
    with torch.no_grad():
        expected = _hf_logits(peft_model)
        assert _rel(ours(TOKENS).float(), expected) < 1e-4

    code, _, err = run(["merge", adapter, tmp_path / "merged"], capsys)
    assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert _rel(_hf_logits(merged), expected) < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    code, _, err = run(["merge", adapter, tmp_path / "merged"], capsys)  # never overwrites
    assert code == 2 and "not empty" in err


def test_pt_on_raw_text_keeps_the_newest_checkpoints(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"The letters {w} reversed are {w[::-1]}.\n" for w in ("abc", "hello", "xyz", "qwer",
                                                                                   "lmnop", "stu", "vw", "ghij") * 4))
    cfg = write_config(tmp_path, datasets=[{"path": str(text)}], validation_datasets=[], validation_split_ratio=0.25,
                       save_steps=1, save_total_limit=2, eval_exact_match_samples=0)
    code, out, err = run(["pt", cfg], capsys)
    assert code == 0, err
    assert "(text): 32 rows -> 24 train + 8 eval documents" in out
    kept = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert kept == ["step_00000002", "step_00000003"]
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    steps = metrics(tmp_path / "out")
    assert len(steps) == 4 and steps[-1]["loss"] < steps[0]["loss"]


def test_tokenize_debug_marks_trained_tokens(tmp_path, capsys):
    code, out, err = run(["tokenize", write_config(tmp_path), "--debug", "--rows", "2"], capsys)
    assert code == 0, err
    assert "row 0:" in out and "row 1:" in out and "[[" in out and "<|im_end|>" in out
    assert (tmp_path / "out" / "tokenized" / "train.tok").is_file()


def test_tokenize_accepts_every_dataset_type(tmp_path, capsys):
    import json

    turns = [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]
    rows = {
        "messages": {"messages": turns},
        "sharegpt": {"conversations": [{"from": "human", "value": "Reverse: abc"}, {"from": "gpt", "value": "cba"}]},
        "alpaca": {"instruction": "Reverse", "input": "abc", "output": "cba"},
        "instruction": {"instruction": "Reverse abc", "output": "cba"},
        "conversation": {"messages": turns},
        "text": {"text": "abc reversed is cba"},
        "auto": {"question": "Reverse abc", "answer": "cba"},
    }
    datasets = []
    for type_, row in rows.items():
        path = tmp_path / f"{type_}.jsonl"
        path.write_text((json.dumps(row) + "\n") * 2)
        datasets.append({"path": str(path), "type": type_})
    code, out, err = run(["tokenize", write_config(tmp_path, datasets=datasets, validation_datasets=[],
                                                   validation_split_ratio=0.0)], capsys)
    assert code == 0, err
    shown = {"sharegpt": "messages", "auto": "response"}
    for type_ in rows:
        assert f"{type_}.jsonl ({shown.get(type_, type_)}): 2 rows -> 2 train + 0 eval documents" in out


def test_report_to_a_missing_package_is_an_error(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    code, _, err = run(["sft", write_config(tmp_path, report_to=["tensorboard"])], capsys)
    assert code == 2 and "report_to" in err and 'pip install "surogate-cli[report]"' in err


# (qlora_fp4 and the fp8-hybrid / nvfp4 recipes take the same path; their CPU references cost 10-30 s here)
@pytest.mark.parametrize("keys", [{"qlora_bnb": True}, {"qlora_fp8": True, "qlora_block_size": 64}])
def test_qlora_and_recipes_pass_through_to_the_model(tmp_path, capsys, keys):
    import inspect

    if not {"qlora", "recipe"} <= set(inspect.signature(load_pretrained).parameters):
        pytest.skip("this surogate-models has no recipes / QLoRA yet (the CLI then refuses these keys: test_config)")
    code, out, err = run(["sft", write_config(tmp_path, lora=True, lora_rank=4, lora_alpha=8, **keys)], capsys)
    if code == 2 and "ModelError" not in err and "cpu" in err.lower():
        pytest.skip(f"needs a GPU: {err.strip()}")
    assert code == 0, err
    steps = metrics(tmp_path / "out")
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
