"""Helpers for the CLI tests: tiny tokenizer folders and configs written into tmp_path."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer_dir(path: Path, *, specials=CHATML_SPECIALS, chat_template=None, eos="<|endoftext|>",
                       bos=None) -> Path:
    """A byte-level tokenizer (one token per ASCII character) with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(list(specials))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"eos_token": eos, "pad_token": eos, "bos_token": bos}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def chatml_model(tmp_path) -> Path:
    """A model folder with only a tokenizer (ChatML template): enough for the data pipeline."""
    from surogate.cli.data.chat import FALLBACK_TEMPLATES

    return make_tokenizer_dir(tmp_path / "model", chat_template=FALLBACK_TEMPLATES["chatml"])
