"""Hugging Face safetensors in and out: round trips (single file and sharded), dtype conversion, transformers
reading what we write, and clear errors for broken folders."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_hf import hf_model, packed_inputs

from surogate.kernels.testing import rel_err
from surogate.models import ModelError, load_pretrained


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A Qwen3 model saved by transformers in shards of at most 20 KB (several files + index)."""
    path = tmp_path_factory.mktemp("sharded")
    hf = hf_model("qwen3", seed=5)
    hf.save_pretrained(path, max_shard_size="20KB")
    return hf, path


def test_sharded_round_trip_identical(sharded, tmp_path):
    hf, src = sharded
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    ours = load_pretrained(src, dtype=torch.float32)
    ours.save_pretrained(tmp_path)
    mine = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert mine["weight_map"] == index["weight_map"]  # same tensors in the same shard files
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    a, b = _tensors(src), _tensors(tmp_path)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    reloaded = load_pretrained(tmp_path, dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), reloaded.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 32


def test_transformers_reads_what_we_write(sharded, tmp_path, generator):
    from transformers import AutoModelForCausalLM

    _, src = sharded
    ours = load_pretrained(src, dtype=torch.float32)
    with torch.no_grad():  # change the weights, so that reading them back proves they were written
        for p in ours.parameters():
            p.mul_(1.1)
    ours.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ids, _, _, _ = packed_inputs(generator, [[12]])
    assert rel_err(hf(input_ids=ids).logits, ours(ids)) < 1e-5


@pytest.mark.parametrize("tied,source", [(False, torch.bfloat16), (True, torch.float16)])
def test_single_file_dtype_conversion(tied, source, tmp_path):
    hf = hf_model("llama", seed=3, tie_word_embeddings=tied).to(source)
    hf.save_pretrained(tmp_path / "src")
    ours = load_pretrained(tmp_path / "src", dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.config.torch_dtype == str(source).removeprefix("torch.")
    ours.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert set(a) == set(b) and ("lm_head.weight" in b) == (not tied)
    for name in a:  # bf16 / fp16 -> fp32 is exact, so the values are identical
        assert b[name].dtype == torch.float32 and torch.equal(a[name].float(), b[name]), name


def test_saving_over_a_sharded_folder_removes_the_stale_index(sharded, tmp_path):
    _, src = sharded
    ours = load_pretrained(src, dtype=torch.float32)
    ours.save_pretrained(tmp_path)
    ours.layout = None  # no source layout: one model.safetensors
    ours.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors*")] == ["model.safetensors"]
    assert load_pretrained(tmp_path, dtype=torch.float32).config.num_layers == 2


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture()
def single(tmp_path):
    path = tmp_path / "model"
    hf_model("qwen2", seed=4).save_pretrained(path)
    return path


def test_only_bf16_or_fp32_compute(single):
    with pytest.raises(ModelError, match="bfloat16 or torch.float32"):
        load_pretrained(single, dtype=torch.float16)


def test_missing_folder_config_and_weights(single, tmp_path):
    with pytest.raises(ModelError, match="not a folder"):
        load_pretrained(tmp_path / "nope")
    (single / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(single)
    torch.save({}, single / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no pickle"):
        load_pretrained(single)
    (single / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        load_pretrained(single)


def test_corrupt_file_is_named(single):
    f = single / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(100))
    with pytest.raises(ModelError, match="model.safetensors: corrupt or unreadable"):
        load_pretrained(single)


def test_truncated_file_is_named(single):
    f = single / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="model.safetensors"):
        load_pretrained(single)


def test_missing_tensor_and_wrong_shape(single):
    f = single / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelError, match="`model.layers.1.mlp.up_proj.weight` is missing"):
        load_pretrained(single)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model.safetensors: tensor `model.layers.1.mlp.up_proj.weight` has shape "
                                         r"\[95, 64\], config.json implies \[96, 64\]"):
        load_pretrained(single)


def test_missing_shard(sharded, tmp_path):
    import shutil

    _, src = sharded
    shutil.copytree(src, tmp_path / "m")
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelError, match=f"{victim.name}: shard listed in model.safetensors.index.json is missing"):
        load_pretrained(tmp_path / "m")


def test_unsupported_dtype_in_file(single):
    f = single / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float64)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelError, match="`model.norm.weight` has dtype F64"):
        load_pretrained(single)
