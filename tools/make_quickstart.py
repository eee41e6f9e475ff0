"""Builds examples/quickstart/: a tiny Qwen3-architecture model, its tokenizer and the data it learns from.

    python tools/make_quickstart.py            # rewrites examples/quickstart/{model,data}

- model/tokenizer.json: a byte-level tokenizer built with the `tokenizers` library: the 256 byte symbols (one token
  per ASCII character, so every digit and letter of the task is its own token) plus <|endoftext|>, <|im_start|>,
  <|im_end|>. tokenizer_config.json carries the special tokens and a ChatML chat_template.
- model/config.json + model.safetensors: Qwen3ForCausalLM, hidden 128, 2 layers, random init (normal, std 0.02;
  norms 1), fp32, 0.46M parameters. (Measured on 2 CPU cores: this model reverses words perfectly after ~400 steps
  of 4 x 128 tokens; the same model with 4 layers had barely started to after 800.)
- data/train.jsonl, data/eval.jsonl: chat examples of one task, "Reverse: knqw" -> "wqnk" (3 to 5 letters). The
  200 eval words never occur in training (26^3 + 26^4 + 26^5 words exist, 8000 are trained on), so exact match on
  them measures that the rule was learned, not memorised.
- data/text.txt: the same task as plain sentences ("The reverse of abc is cba."), for `surogate pt`.
Deterministic: the same seed gives the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
SEED = 0
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODEL = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
    "use_cache": True,
}
N_TRAIN = 8000
N_EVAL = 200
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def build_tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(SPECIAL)
    return tok


def task(rng: random.Random, used: set[str] | None = None) -> tuple[str, str, str]:
    """(word, prompt, answer) for a random word of 3 to 5 letters not in `used`."""
    while True:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if used is None or word not in used:
            return word, f"Reverse: {word}", word[::-1]


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def init_weights(cfg: dict, vocab_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * cfg["initializer_range"]

    w = {"model.embed_tokens.weight": normal(vocab_size, h), "model.norm.weight": torch.ones(h),
         "lm_head.weight": normal(vocab_size, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": normal(nq * d, h),
            p + "self_attn.k_proj.weight": normal(nkv * d, h),
            p + "self_attn.v_proj.weight": normal(nkv * d, h),
            p + "self_attn.o_proj.weight": normal(h, nq * d),
            p + "self_attn.q_norm.weight": torch.ones(d),
            p + "self_attn.k_norm.weight": torch.ones(d),
            p + "mlp.gate_proj.weight": normal(i, h),
            p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
        }
    return {k: v.contiguous() for k, v in w.items()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    model_dir, data_dir = ROOT / "model", ROOT / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    tok.save(str(model_dir / "tokenizer.json"))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos = tok.token_to_id("<|endoftext|>")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "model_max_length": MODEL["max_position_embeddings"],
        "chat_template": CHATML,
    }, indent=2) + "\n", encoding="utf-8")

    cfg = {**MODEL, "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": eos, "pad_token_id": eos}
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, tok.token_to_id(
        "<|im_end|>")], "pad_token_id": eos}, indent=2) + "\n", encoding="utf-8")
    gen = torch.Generator().manual_seed(SEED)
    weights = init_weights(cfg, vocab_size, gen)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    rng = random.Random(SEED)
    eval_rows, eval_words = [], set()
    for _ in range(N_EVAL):
        word, prompt, answer = task(rng, eval_words)
        eval_words.add(word)
        eval_rows.append(chat(prompt, answer))
    train = [chat(*task(rng, eval_words)[1:]) for _ in range(N_TRAIN)]
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "eval.jsonl", eval_rows)
    lines = []
    for _ in range(N_TRAIN // 2):
        word, _, answer = task(rng, eval_words)
        lines.append(f"The reverse of {word} is {answer}.")
    (data_dir / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    n_params = sum(v.numel() for v in weights.values())
    size = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"wrote {ROOT}: vocab {vocab_size}, {n_params / 1e6:.2f}M parameters, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
