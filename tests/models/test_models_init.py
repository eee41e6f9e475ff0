import torch

from surogate.models import LoraConfig, ModelConfig, init_model

CONFIG = dict(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101, tie_word_embeddings=False)


def test_init_model_shapes_and_statistics():
    model = init_model(CONFIG, dtype=torch.float32, seed=3)
    config = ModelConfig.from_dict(CONFIG)
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape == (config.qkv_size, 64)
    assert abs(qkv.std().item() - 0.02) < 0.004
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert model.lm_head.weight.shape == (101, 64)
    again = init_model(CONFIG, dtype=torch.float32, seed=3)
    assert torch.equal(again.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_init_model_trains_with_lora():
    model = init_model(CONFIG, dtype=torch.float32, lora=LoraConfig(rank=4, alpha=8))
    ids = torch.randint(0, 101, (2, 12))
    loss_sum, n_valid = model.loss_sum(ids, ids)
    loss_sum.backward()
    names = [n for n, _ in model.trainable_parameters()]
    assert names and all(".lora_" in n for n in names)
    assert int(n_valid) == 24 and torch.isfinite(loss_sum)
    # B starts at zero (peft's init), so only B receives a gradient on the first step
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.trainable_parameters() if "lora_B" in n)
