"""Dataset types: how a row becomes a conversation (trained on its assistant turns) or raw text (trained on all of it).

- messages / sharegpt: a list of turns, {role, content} or ShareGPT {from, value}; roles normalised (human -> user,
  gpt/bot/model -> assistant, observation/function_response -> tool); a stringified list is parsed.
- conversation: like messages, with configurable field names (messages_field, message_property_mappings).
- alpaca: instruction (+ "\\n" + input) -> output.
- instruction: prompt_format / prompt_format_no_input filled from the row -> output_field.
- text: the text_field as raw text.
- auto: picks one of the above from the first row's keys (also question/answer style columns).
A row that cannot be converted raises RowError(kind, reason): the caller counts it ("empty" or "malformed").
"""

from __future__ import annotations

import json
import string
from typing import Any

import attrs

from ..config import DatasetConfig
from ..errors import DataError


@attrs.define
class Chat:
    messages: list[dict]


@attrs.define
class Text:
    text: str


class RowError(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


_ROLES = {
    "user": "user", "human": "user", "system": "system",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "tool": "tool", "function_response": "tool", "observation": "tool", "observations": "tool", "ipython": "tool",
}
_MESSAGE_FIELDS = ("messages", "conversations", "conversation")
_QUERY_FIELDS = ("query", "prompt", "question", "problem", "instruction", "input")
_RESPONSE_FIELDS = ("response", "answer", "output", "completion", "solution", "target", "targets")


def resolve_type(ds: DatasetConfig, first_row: Any, command: str | None) -> str:
    """The effective type of a dataset: its own, or for `auto` the one its first row's keys suggest."""
    if ds.type == "sharegpt":
        return "messages"
    if ds.type != "auto":
        return ds.type
    if command == "pt":
        return "text"
    if not isinstance(first_row, dict):
        raise DataError(f"rows must be JSON objects, the first row is {type(first_row).__name__}", file=ds.path,
                        fix="write one object per row, e.g. {\"messages\": [...]}")
    keys = set(first_row)
    if ds.messages_field in keys or keys & set(_MESSAGE_FIELDS):
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if _first(keys, _QUERY_FIELDS) and _first(keys, _RESPONSE_FIELDS):
        return "response"
    if ds.text_field in keys:
        return "text"
    raise DataError(f"cannot tell the dataset type from the row keys {sorted(keys)}", file=ds.path,
                    fix="set type: messages, alpaca, instruction, conversation or text (and its field names)")


def _first(keys, names):
    return next((n for n in names if n in keys), None)


def to_example(row: Any, ds: DatasetConfig, kind: str) -> Chat | Text:
    """Convert one row. Raises RowError("empty" | "malformed", reason)."""
    if not isinstance(row, dict):
        raise RowError("malformed", f"a row must be a JSON object, got {type(row).__name__}")
    if kind == "text":
        return Text(_text(row, ds.text_field))
    if kind == "messages":
        field = ds.messages_field if ds.messages_field in row else _first(row, _MESSAGE_FIELDS)
        if field is None:
            raise RowError("malformed", f"missing field {ds.messages_field!r} (a list of turns)")
        turns = _turn_list(row[field], field)
        messages = [_turn(t, i, ("role", "from"), ("content", "value")) for i, t in enumerate(turns)]
        return _finish_chat(messages, row, ds)
    if kind == "conversation":
        if ds.messages_field not in row:
            raise RowError("malformed", f"missing field {ds.messages_field!r} (a list of turns)")
        turns = _turn_list(row[ds.messages_field], ds.messages_field)
        role_key = ds.message_property_mappings.get("role", "role")
        content_key = ds.message_property_mappings.get("content", "content")
        messages = [_turn(t, i, (role_key,), (content_key,)) for i, t in enumerate(turns)]
        return _finish_chat(messages, row, ds)
    if kind == "alpaca":
        instruction = _text(row, ds.instruction_field)
        extra = _optional(row, ds.input_field)
        user = f"{instruction}\n{extra}" if extra else instruction
        return _finish_chat([{"role": "user", "content": user},
                             {"role": "assistant", "content": _text(row, ds.output_field)}], row, ds)
    if kind == "instruction":
        instruction = _text(row, ds.instruction_field)
        extra = _optional(row, ds.input_field)
        fmt = ds.prompt_format if extra else ds.prompt_format_no_input
        values = {k: ("" if v is None else v) for k, v in row.items()}
        values.update(instruction=instruction, input=extra)
        try:
            user = string.Formatter().vformat(fmt, (), values)
        except (KeyError, IndexError) as e:
            raise RowError("malformed", f"prompt_format refers to {e} which this row lacks") from None
        return _finish_chat([{"role": "user", "content": user},
                             {"role": "assistant", "content": _text(row, ds.output_field)}], row, ds)
    if kind == "response":
        q, r = _first(row, _QUERY_FIELDS), _first(row, _RESPONSE_FIELDS)
        if q is None or r is None:
            raise RowError("malformed", f"needs a question column ({', '.join(_QUERY_FIELDS)}) and an answer column "
                           f"({', '.join(_RESPONSE_FIELDS)})")
        answer = row[r][0] if isinstance(row[r], list) and row[r] else row[r]
        return _finish_chat([{"role": "user", "content": _as_text(row[q], q)},
                             {"role": "assistant", "content": _as_text(answer, r)}], row, ds)
    raise ValueError(f"unknown dataset type {kind!r}")  # config validation makes this unreachable


def _text(row: dict, field: str) -> str:
    """The non-empty text of a required field (RowError when it is missing or empty)."""
    if field not in row:
        raise RowError("malformed", f"missing field {field!r}")
    text = _as_text(row[field], field)
    if not text.strip():
        raise RowError("empty", f"field {field!r} is empty")
    return text


def _as_text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):  # [{"type": "text", "text": ...}]
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RowError("malformed", f"field {field!r} must be text, got {type(value).__name__}")


def _optional(row: dict, field: str) -> str:
    return _as_text(row.get(field), field).strip() if field in row else ""


def _turn_list(value: Any, field: str) -> list:
    if isinstance(value, str):  # a list saved as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("malformed", f"field {field!r} must be a list of turns, got a string") from None
    if not isinstance(value, list):
        raise RowError("malformed", f"field {field!r} must be a list of turns, got {type(value).__name__}")
    if not value:
        raise RowError("empty", f"field {field!r} has no turns")
    return value


def _turn(turn: Any, i: int, role_keys: tuple, content_keys: tuple) -> dict:
    if not isinstance(turn, dict):
        raise RowError("malformed", f"turn {i} must be an object with a role and a content")
    role_key = next((k for k in role_keys if k in turn), None)
    content_key = next((k for k in content_keys if k in turn), None)
    if role_key is None or content_key is None:
        raise RowError("malformed", f"turn {i} needs keys {'/'.join(role_keys)} and {'/'.join(content_keys)}, "
                       f"has {sorted(turn)}")
    raw_role = str(turn[role_key]).strip().lower()
    role = _ROLES.get(raw_role)
    if role is None:
        raise RowError("malformed", f"turn {i} has unknown role {turn[role_key]!r}")
    message = {"role": role, "content": _as_text(turn[content_key], f"turn {i} {content_key}")}
    if role == "assistant" and turn.get("reasoning_content"):
        message["reasoning_content"] = _as_text(turn["reasoning_content"], f"turn {i} reasoning_content")
    return message


def _finish_chat(messages: list[dict], row: dict, ds: DatasetConfig) -> Chat:
    system = None
    if ds.system_field and row.get(ds.system_field):
        system = _as_text(row[ds.system_field], ds.system_field)
    elif ds.system_prompt:
        system = ds.system_prompt
    elif row.get("system") and isinstance(row["system"], str):
        system = row["system"]
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        if any(m["role"] == "assistant" for m in messages):
            raise RowError("empty", "every assistant turn is empty")
        raise RowError("malformed", "no assistant turn to train on")
    return Chat(messages)
