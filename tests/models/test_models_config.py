"""ModelConfig from Hugging Face config.json: the three architectures, both rope styles, and clear errors."""

import json

import pytest
import torch
from tiny_hf import CONFIGS, LLAMA3_ROPE, hf_model

from surogate.models import ModelConfig, ModelError


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_reads_what_transformers_writes(arch, tmp_path):
    hf_model(arch).save_pretrained(tmp_path)
    c = ModelConfig.from_hf(tmp_path)
    src = CONFIGS[arch]
    assert c.architecture == src["architectures"][0]
    assert (c.hidden_size, c.intermediate_size, c.num_layers) == (64, 96, 2)
    assert (c.num_heads, c.num_kv_heads, c.vocab_size) == (4, 2, 128)
    assert c.head_dim == src.get("head_dim", 64 // 4)
    assert c.rope_theta == src["rope_theta"] and c.rope_scaling is None
    assert c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 256
    assert c.tie_word_embeddings == src["tie_word_embeddings"]
    assert c.qkv_bias == (arch == "qwen2") and not c.o_bias
    assert c.qk_norm == (arch == "qwen3")
    assert c.torch_dtype == "float32"


def test_transformers4_style_and_defaults(tmp_path):
    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
           "num_hidden_layers": 3, "num_attention_heads": 8, "vocab_size": 1000, "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}},
           "attention_bias": True, "torch_dtype": "bfloat16"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = ModelConfig.from_hf(tmp_path / "config.json")
    assert c.num_kv_heads == 8 and c.head_dim == 16  # no GQA key: MHA; head_dim = hidden / heads
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3" and "type" not in c.rope_scaling
    assert c.qkv_bias and c.o_bias  # Llama attention_bias: q, k, v and o
    assert c.rms_norm_eps == 1e-6 and not c.tie_word_embeddings
    assert c.to_hf_dict(torch.float32)["torch_dtype"] == "float32"


def test_model_type_without_architectures():
    raw = dict(CONFIGS["qwen3"])
    del raw["architectures"]
    assert ModelConfig.from_dict(raw).architecture == "Qwen3ForCausalLM"


def test_transformers5_llama3_rope_parameters(tmp_path):
    hf_model("llama", rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0)).save_pretrained(tmp_path)
    c = ModelConfig.from_hf(tmp_path)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == LLAMA3_ROPE


def _error(raw, match, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=match):
        ModelConfig.from_hf(tmp_path)


def test_unknown_architecture_lists_supported(tmp_path):
    raw = dict(CONFIGS["llama"], architectures=["MistralForCausalLM"], model_type="mistral")
    _error(raw, "MistralForCausalLM is not supported. Supported: LlamaForCausalLM, Qwen2ForCausalLM, "
                "Qwen3ForCausalLM", tmp_path)  # fmt: skip


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"num_key_value_heads": 3}, "must divide"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"torch_dtype": "float8"}, "torch_dtype"),
])  # fmt: skip
def test_unsupported_settings(change, match, tmp_path):
    _error(dict(CONFIGS["llama"], **change), match, tmp_path)


def test_missing_key_is_named(tmp_path):
    raw = dict(CONFIGS["qwen2"])
    del raw["vocab_size"]
    _error(raw, "`vocab_size` is missing", tmp_path)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
