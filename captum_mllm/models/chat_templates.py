"""Where a chat template puts each message, for :class:`HFCausalLMAdapter`.

A template is Jinja code of the checkpoint's; the adapter renders the chat
with it and needs each message's characters in the rendering (features are
located there, never in template text), the template keywords the caller may
set, and the template a processor keeps apart from its tokenizer.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

from captum_mllm.errors import ChatTemplateError, InvalidOptionError

SENTINEL = "\ue000{}\ue001"  # private-use characters: never in a template

#: :func:`locate_contents`' mark of a content the template rewrote.
REWRITTEN = -1
#: its mark of a content rendered as a JSON string's inside (``| tojson``).
ESCAPED = -2


def json_escapes(text: str) -> list[str]:
    """Each character of ``text`` as transformers' ``tojson`` writes it inside a
    JSON string (``"\\n"`` for a line break): joined, ``json.dumps(text)``'s inside."""
    return [json.dumps(c, ensure_ascii=False)[1:-1] for c in text]


def locate_contents(
    render: Callable[[list[dict[str, Any]], bool], str],
    messages: list[dict[str, Any]],
    rendered: str,
) -> list[tuple[int, int, int]]:
    """Where each message's content lies in the rendering of the chat.

    The chat is rendered once more with each content replaced by a sentinel;
    the template text between sentinels is then matched piece by piece against
    the real rendering, so a content is only ever found in its own turn, never
    in template text (a default system prompt, a role header).

    Returns:
        list of (start, end, trimmed): character span of each content, and how
        many leading characters the template trimmed from it; :data:`ESCAPED`
        for a content rendered as the inside of a JSON string (``| tojson``);
        :data:`REWRITTEN` for a content the template changed otherwise, whose
        span is then what it renders between the template text around it.
    """
    # An empty content (a tool call's message) stays empty: a template may render
    # text around a content only when there is one (Qwen2.5's "\n" + content).
    given = [k for k, m in enumerate(messages) if m["content"]]
    marked = [
        {**m, "content": SENTINEL.format(k)} if k in given else m for k, m in enumerate(messages)
    ]
    skeleton = render(marked, True)
    split = re.split("\ue000(\\d+)\ue001", skeleton)
    pieces, order = split[0::2], [int(k) for k in split[1::2]]
    if sorted(order) != given:
        raise ChatTemplateError(
            "the chat template repeats or drops message contents; it cannot be explained "
            "by position (render it yourself and use Captum's TextTemplateInput)"
        )
    # In the order rendered: Mistral's template puts the system prompt in the last user turn
    out: dict[int, tuple[int, int, int]] = {}
    cursor = 0
    for j, k in enumerate(order):
        if not rendered.startswith(pieces[j], cursor):
            raise ChatTemplateError(f"the chat template renders turn {k} differently per content")
        cursor += len(pieces[j])
        content = messages[k]["content"]
        lead = len(content) - len(content.lstrip())
        # As given, or trimmed by the template (e.g. Jinja's ``| trim``).
        for text, trimmed in (
            (content, 0),
            (content.strip(), lead),
            (content.lstrip(), lead),
            (content.rstrip(), 0),
            (json.dumps(content, ensure_ascii=False)[1:-1], ESCAPED),  # Llama 3.1's tool outputs
        ):
            after = cursor + len(text)
            if rendered.startswith(text, cursor) and rendered.startswith(pieces[j + 1], after):
                out[k] = (cursor, after, trimmed)
                cursor = after
                break
        else:
            # Rewritten (Qwen3's template drops an earlier answer's <think> block):
            # the turn's text is what the template renders up to its next text.
            after_text = pieces[j + 1]
            if j + 1 == len(order):
                end = len(rendered) - len(after_text) if rendered.endswith(after_text) else -1
            else:  # the first of the template text that follows (never in a content)
                end = rendered.find(after_text, cursor) if after_text else -1
            if end < cursor:
                raise ChatTemplateError(
                    f"the chat template changed the text of turn {k}; cannot locate "
                    f"{content[:40]!r}"
                )
            out[k] = (cursor, end, REWRITTEN)
            cursor = end
    for k in range(len(messages)):  # an empty content: where the one before it ends
        out.setdefault(k, (out[k - 1][1], out[k - 1][1], 0) if k else (0, 0, 0))
    return [out[k] for k in range(len(messages))]


def as_parts(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with a string content as one text part."""
    content = message.get("content")
    if not isinstance(content, str):
        return message
    return {**message, "content": [{"type": "text", "text": content}]}


def text_tokenizer(tokenizer: Any) -> Any:
    """A processor's tokenizer (a multimodal checkpoint's ``AutoProcessor``),
    with the processor's chat template, which holds the checkpoint's own;
    a tokenizer as it is."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or not callable(getattr(inner, "apply_chat_template", None)):
        return tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if template and template != getattr(inner, "chat_template", None):
        inner = copy.copy(inner)  # the processor's own tokenizer keeps its template
        inner.chat_template = template
    return inner


def processor_template(name_or_path: str, common: dict[str, Any]) -> str | None:
    """The chat template a vision-language checkpoint keeps for its processor
    in ``chat_template.json`` (Llava's, SmolVLM's), which ``AutoTokenizer``
    does not read; None without one."""
    from transformers.utils import cached_file

    hub = {k: v for k, v in common.items() if k in HUB_KWARGS}
    path = cached_file(  # a base model has none: nothing to raise about
        name_or_path,
        "chat_template.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub,
    )
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    return template if isinstance(template, str) and template else None


#: ``from_pretrained`` settings of where a checkpoint's files come from.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")

#: apply_chat_template's arguments that the adapter sets itself.
OWN_TEMPLATE_ARGS = {"conversation", "messages", "tokenize", "add_generation_prompt"}


def template_kwargs(given: Any) -> dict[str, Any]:
    """``chat_template_kwargs`` as a dict of the template's own keywords (a
    duplicate of ours raised a TypeError inside transformers or jinja2)."""
    if given is None:
        return {}
    if not isinstance(given, dict) or not all(isinstance(k, str) for k in given):
        raise InvalidOptionError(
            f"chat_template_kwargs must be a dict of keyword names, got {given!r}"
        )
    own = sorted(OWN_TEMPLATE_ARGS & set(given))
    if own:
        raise InvalidOptionError(
            f"chat_template_kwargs {own} are set by the adapter (the chat, and the "
            "generation prompt it needs); leave them out"
        )
    return dict(given)
