"""Chat conversations to token ids and a trainable mask, rendered with the model's own chat template.

Rendering follows transformers' apply_chat_template: a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, raise_exception, strftime_now, a tojson that does not escape HTML, loop controls and the
`{% generation %}` tag that marks assistant text. The rendered text is tokenized with no BOS/EOS added
(the template writes its own).
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

from ..errors import ConfigError
from ..formats.tokenizer import Tokenizer

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


def check_messages(messages, where: str) -> None:
    """Refuse anything but a non-empty list of {"role": str, "content": str, ...}."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConfigError(f"{where}: messages[{i}] must be an object with string \"role\" and \"content\"")


def assistant_spans(template: str, messages: list[dict], text: str, variables: dict,
                    where: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (the whole conversation rendered), found by rendering
    prefixes: turn i is what messages[:i+1] adds to messages[:i] with the generation prompt."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, _ = render(template, messages[:i], add_generation_prompt=True, variables=variables, where=where)
        upto, _ = render(template, messages[: i + 1], variables=variables, where=where)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ConfigError(f"{where}: the chat template renders messages[{i}] differently inside and at the end "
                              f"of the conversation, so its assistant text cannot be located; use a template with "
                              f"{{% generation %}} or train_on_prompt")
        spans.append((len(before), len(upto)))
    return spans


def encode_chat(tokenizer: Tokenizer, messages: list[dict], *, train_on_prompt: bool = False,
                where: str = "chat", train_from: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and which of them are trained on: the assistant turns, or all.
    With train_from, only the assistant turns from messages[train_from] on (a preference pair's response,
    after a prompt that may hold assistant turns of its own)."""
    check_messages(messages, where)
    template = tokenizer.chat_template
    if template is None:
        raise ConfigError(f"{where}: chat messages need a chat template, and {tokenizer.path} has none "
                          f"(chat_template.jinja or chat_template in tokenizer_config.json)")
    variables = dict(tokenizer.template_tokens)
    text, spans = render(template, messages, variables=variables, where=where)
    ids, offsets = tokenizer.encode_with_offsets(text)
    if train_on_prompt:
        return ids, [True] * len(ids)
    if not has_generation_tag(template):
        spans = assistant_spans(template, messages, text, variables, where)
    if train_from:
        # The prompt as the model sees it before answering: whatever follows it is the response.
        prompt, _ = render(template, messages[:train_from], add_generation_prompt=True, variables=variables,
                           where=where)
        if not text.startswith(prompt):
            raise ConfigError(f"{where}: the chat template renders the prompt differently on its own and before "
                              f"the response, so the response cannot be located")
        spans = [(max(a, len(prompt)), b) for a, b in spans if b > len(prompt)]
    # A token is trained on if it overlaps an assistant span, as transformers' assistant mask decides.
    return ids, [any(e > a and s < b for a, b in spans) for s, e in offsets]
