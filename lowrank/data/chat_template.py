"""Chat templates: the model's own Jinja template, rendered exactly as transformers renders it.

Hub templates are untrusted code, so they run in Jinja's immutable sandbox. The environment
copies transformers' (utils/chat_template_utils.py): ``trim_blocks`` and ``lstrip_blocks`` (the
published templates render as intended only with both), the ``loopcontrols`` extension, a
``{% generation %}`` block (rendered as its body), ``raise_exception``, ``strftime_now``, a
``tojson`` that keeps non-ASCII characters and does not HTML-escape, and a ``namespace`` that
refuses underscore attributes. Messages are passed as transformers passes them: keys whose value
is None are dropped, and reasoning given as ``thinking`` / ``reasoning`` is also offered as
``reasoning_content``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError, DataError

# ChatML as Qwen writes it, without Qwen2.5's default system prompt (transformers' old default).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# DeepSeek-LLM chat (also DeepSeek-V2): "User: ...\n\nAssistant: ...<｜end▁of▁sentence｜>".
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "deepseek": DEEPSEEK_TEMPLATE}

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def resolve_template(value: str) -> str:
    """A --chat-template value as Jinja source: a built-in name, a file holding the template, or
    the source itself. A value without Jinja that names no file (a path or a name mistyped) is
    refused, not rendered as a constant template (which trained nothing and failed later,
    blaming max_len)."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{" in value or "\n" in value:  # Jinja source
        return value
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # a name too long to be a file
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"chat template {path}: not UTF-8 text ({e})") from None
    # No file, and no Jinja in it: a path or a name mistyped; as a template it would render one
    # constant line.
    what = "no such file" if value.endswith((".jinja", ".j2", ".txt")) or os.sep in value or "/" in value else \
        "not a built-in name, a file or Jinja source"
    raise ConfigError(f"chat template {value!r}: {what} (a template is a built-in name "
                      f"({', '.join(BUILTIN_TEMPLATES)}), a .jinja file or Jinja source)")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    """Render `messages` with the Jinja source `template`; kwargs (bos_token, eos_token, tools,
    enable_thinking, ...) become template variables."""
    compiled = compile_chat_template(template)
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    try:
        return compiled.render(messages=[_template_message(m) for m in messages],
                               add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        # raise_exception() in a template means the conversation breaks the model's rules.
        raise DataError(f"the chat template refused the conversation: {e}") from None


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def _template_message(message: dict) -> dict:
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore attributes (a way out of the sandbox)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()
