"""Chat conversations to token ids and a trainable mask, rendered with the model's own chat template.

formats/chat_template.py renders as transformers' apply_chat_template does; the rendered text is tokenized with
no BOS/EOS added (the template writes its own).
"""
from __future__ import annotations

from ..errors import ConfigError
from ..formats.chat_template import has_generation_tag, render
from ..formats.tokenizer import Tokenizer


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
