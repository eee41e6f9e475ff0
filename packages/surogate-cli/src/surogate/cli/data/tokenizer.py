"""The model's tokenizer: tokenizer.json through the `tokenizers` library, plus tokenizer_config.json (special
tokens, chat_template; chat_template.jinja and special_tokens_map.json are read too). No Python tokenizer code from
the model folder is ever run.

Chat examples become (ids, trained) pairs: the conversation is rendered with the chat template, tokenised once with
character offsets, and a token is trained when its characters overlap an assistant span (see chat.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from jinja2 import TemplateSyntaxError

from ..errors import UserError
from .chat import FALLBACK_TEMPLATES, ChatTemplate, TemplateRenderError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"is not valid JSON ({e})", file=str(path),
                        fix="restore the file from the model's source") from None
    if not isinstance(data, dict):
        raise UserError("must hold a JSON object", file=str(path), fix="restore the file from the model's source")
    return data


class Tokenizer:
    """Encode / decode with the model's tokenizer.json; render chats with its (or a built-in) chat template."""

    def __init__(self, model_dir: str | Path, chat_template: str = "auto"):
        from tokenizers import Tokenizer as _HFTokenizer

        self.model_dir = Path(model_dir)
        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError("tokenizer.json not found", file=str(self.model_dir),
                            fix="copy the model's tokenizer.json into the model folder (surogate reads fast "
                                "tokenizers only)")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exception subclasses
            raise UserError(f"cannot be read by the tokenizers library ({e})", file=str(path),
                            fix="restore tokenizer.json from the model's source") from None
        cfg_path = self.model_dir / "tokenizer_config.json"
        self.config = _read_json(cfg_path) if cfg_path.is_file() else {}
        special_path = self.model_dir / "special_tokens_map.json"
        special = _read_json(special_path) if special_path.is_file() else {}
        model_cfg_path = self.model_dir / "config.json"
        model_cfg = _read_json(model_cfg_path) if model_cfg_path.is_file() else {}

        def token(name: str) -> str | None:
            return _token_text(self.config.get(name)) or _token_text(special.get(name))

        self.bos_token = token("bos_token")
        self.eos_token = token("eos_token")
        self.pad_token = token("pad_token")
        self.eos_id = self._id_or_none(self.eos_token)
        if self.eos_id is None and isinstance(model_cfg.get("eos_token_id"), int):
            self.eos_id = model_cfg["eos_token_id"]
            self.eos_token = self._tok.id_to_token(self.eos_id)
        if self.eos_id is None:
            raise UserError("no end-of-text token: tokenizer_config.json has no eos_token and config.json no "
                            "eos_token_id", file=str(self.model_dir), fix="add \"eos_token\" to tokenizer_config.json")
        self.pad_id = self._id_or_none(self.pad_token)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.template = self._load_template(chat_template)

    def _id_or_none(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def _load_template(self, choice: str) -> ChatTemplate | None:
        if choice != "auto":
            return ChatTemplate(FALLBACK_TEMPLATES[choice], bos_token=self.bos_token or "",
                                eos_token=self.eos_token or "", name=choice)
        source, file = self.config.get("chat_template"), "tokenizer_config.json"
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_path = self.model_dir / "chat_template.jinja"
        if not source and jinja_path.is_file():
            source, file = jinja_path.read_text(encoding="utf-8"), "chat_template.jinja"
        if not source:
            return None
        try:
            return ChatTemplate(source, bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateSyntaxError as e:
            raise UserError(f"the chat_template is not valid jinja2 (line {e.lineno}: {e.message})",
                            file=str(self.model_dir / file), fix="fix the template, or set chat_template: chatml "
                            "(or llama3, qwen3) in the config to use a built-in one") from None

    # ------------------------------------------------------------------------------------------------ encoding
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or f"<{i}>"

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw text for language modelling: the tokenizer's own specials (a BOS for Llama), the text, then EOS;
        every token is trained."""
        ids = self._tok.encode(text, add_special_tokens=True).ids + [self.eos_id]
        ids = np.asarray(ids, dtype=np.int32)
        return ids, np.ones(len(ids), dtype=bool)

    def require_template(self, dataset: str) -> ChatTemplate:
        if self.template is None:
            raise UserError("the tokenizer has no chat template, and this dataset needs one to turn conversations "
                            "into text", file=dataset,
                            fix=f"add a chat_template to {self.model_dir / 'tokenizer_config.json'}, or set "
                                "chat_template: chatml (or llama3, qwen3) in the config")
        return self.template

    def encode_chat(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained): trained[t] is True for tokens of assistant turns (content and end-of-turn marker).
        Raises TemplateRenderError when the template rejects the conversation."""
        full, spans = self.template.render_with_spans(messages)
        enc = self._tok.encode(full, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int32)
        trained = np.zeros(len(ids), dtype=bool)
        if len(ids):
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            for start, end in spans:
                trained |= (offsets[:, 1] > start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0])
        if not trained.any():
            raise TemplateRenderError("no assistant tokens to train on")
        return ids, trained

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """The prompt for generation: the turns so far plus the template's generation prompt."""
        return self.encode(self.template.render(messages, add_generation_prompt=True))

    def stop_ids(self) -> set[int]:
        """Tokens that end a generated answer: EOS and the end-of-turn markers this vocabulary has."""
        out = {self.eos_id}
        for marker in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>"):
            i = self._tok.token_to_id(marker)
            if i is not None:
                out.add(i)
        return out

    def fingerprint_files(self) -> list[Path]:
        return [self.model_dir / f for f in TOKENIZER_FILES if (self.model_dir / f).is_file()]

    def save(self, out_dir: str | Path) -> None:
        """Copy the tokenizer files next to a saved model so that the output folder is self-contained."""
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            src = self.model_dir / f
            if src.is_file():
                shutil.copyfile(src, Path(out_dir) / f)


__all__ = ["TOKENIZER_FILES", "TemplateRenderError", "Tokenizer"]
