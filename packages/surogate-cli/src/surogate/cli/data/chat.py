"""Chat templates: rendered in a jinja2 ImmutableSandboxedEnvironment (no attribute access to Python internals, no
file or code access), with the helpers Hugging Face templates expect (raise_exception, tojson, strftime_now).

Assistant spans (the characters a chat example trains on) are found by rendering prefixes: for assistant turn i,
P = render(turns before i, add_generation_prompt=True) and S = render(turns up to i); when the full rendering starts
with S and S starts with P, the turn is the characters [len(P), len(S)) (its content and the end-of-turn marker the
template writes). Templates that render earlier turns differently from the last one (Qwen3 drops past <think>
blocks) fail that test; then the turn's content is searched for in the full rendering after the previous span, and
the span is extended over the end-of-turn marker that follows it. A turn found neither way makes the row malformed.
"""

from __future__ import annotations

import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Built-in templates for tokenizers that ship none (chat_template: chatml | llama3 | qwen3 in the config).
FALLBACK_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Qwen3 without thinking: an assistant turn with `reasoning_content` keeps it in a <think> block; the
    # generation prompt opens an empty think block (enable_thinking=False behaviour of the official template).
    "qwen3": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' and message.get('reasoning_content') %}"
        "{{ '<|im_start|>assistant\\n<think>\\n' + message['reasoning_content'] | trim + '\\n</think>\\n\\n'"
        " + message['content'] + '<|im_end|>\\n' }}"
        "{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    ),
}

# Markers that close a turn; a fallback span is extended over one of these when it follows the content.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>", "<end_of_turn>")


class TemplateRenderError(ValueError):
    """The template refused this conversation (raise_exception) or failed while rendering it."""


def _raise_exception(message: str):
    raise TemplateRenderError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str):
    """Compile a template (jinja2.TemplateSyntaxError on a bad one: the caller names the file)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it is rendered with."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "tokenizer"):
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = compile_template(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, tools=None,
                                         enable_thinking=False)
        except TemplateRenderError:
            raise
        except TemplateError as e:
            raise TemplateRenderError(f"the chat template failed: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise TemplateRenderError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the [start, end) character spans of every assistant turn."""
        full = self.render(messages)
        spans = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span = self._span_by_prefix(messages, i, full)
            if span is None or span[0] < cursor:
                span = self._span_by_search(message["content"], full, cursor)
            if span is None:
                raise TemplateRenderError(f"assistant turn {i} could not be located in the rendered chat template")
            spans.append(span)
            cursor = span[1]
        return full, spans

    def _span_by_prefix(self, messages, i, full):
        prefix = self.render(messages[:i], add_generation_prompt=True) if i > 0 else self._generation_prompt_only()
        upto = self.render(messages[: i + 1])
        if prefix is None or not upto.startswith(prefix) or not full.startswith(upto) or len(upto) <= len(prefix):
            return None
        return len(prefix), len(upto)

    def _generation_prompt_only(self):
        try:
            return self.render([], add_generation_prompt=True)
        except TemplateRenderError:
            return None

    @staticmethod
    def _span_by_search(content: str, full: str, cursor: int):
        content = content.strip()
        if not content:
            return None
        start = full.find(content, cursor)
        if start < 0:
            return None
        end = start + len(content)
        rest = full[end:]
        stripped = rest.lstrip(" \t")
        for marker in _END_OF_TURN:
            if stripped.startswith(marker):
                end += len(rest) - len(stripped) + len(marker)
                break
        return start, end
