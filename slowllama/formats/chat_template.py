"""A model's chat template rendered as transformers' apply_chat_template renders it.

A sandboxed jinja2 environment with trim_blocks and lstrip_blocks, raise_exception, strftime_now, a tojson that
does not escape HTML, loop controls and the `{% generation %}` tag that marks assistant text. The template is part
of the tokenizer's format (tokenizer_config.json, GGUF's tokenizer.chat_template), so it lives with the formats;
data/chat.py turns the rendered text into training ids and masks.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

from ..errors import ConfigError

_GENERATION_TAG = ContextVar("generation_spans", default=None)  # (blocks rendered so far, spans) while tracking


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records the character span its body renders to."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_span"), [], [], body).set_lineno(lineno)

        def _span(self, caller):
            text = caller()
            tracking = _GENERATION_TAG.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(map(len, blocks))  # the output before this tag has already been yielded
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not parse: line {e.lineno}: {e.message}") from e


def has_generation_tag(template: str) -> bool:
    """Whether the template marks assistant text itself with {% generation %} (transformers' test)."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
           variables: dict | None = None, where: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of its {% generation %} blocks). `where` (file:line) leads a refusal's line."""
    import jinja2

    compiled = _compile(template)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers drops None keys
    blocks, spans = [], []
    token = _GENERATION_TAG.set((blocks, spans))
    try:
        for block in compiled.generate(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **(variables or {})):
            blocks.append(block)
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where + ': ' if where else ''}chat template refused the conversation: {e}") from e
    finally:
        _GENERATION_TAG.reset(token)
    return "".join(blocks), spans
