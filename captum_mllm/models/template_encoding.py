"""Encoding a chat through a Hugging Face chat template: the rendered prompt's
tokens, each placed in its turn and part (the position table features come from)."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import torch

from captum_mllm.chat import Chat, as_chat
from captum_mllm.encoding import EncodedChat, PositionTableBuilder
from captum_mllm.errors import (
    ChatTemplateError,
    InvalidContentError,
    InvalidModelError,
    warn_caller,
)
from captum_mllm.models.base import ModelAdapter, Response
from captum_mllm.models.chat_templates import (
    ESCAPED,
    REWRITTEN,
    SENTINEL,
    as_parts,
    json_escapes,
    locate_contents,
    template_kwargs,
)


class ChatTemplateEncoding(ModelAdapter):
    """An adapter's encoding of chats by its tokenizer's chat template (see
    :class:`~captum_mllm.models.hf_causal.HFCausalLMAdapter`): each token's turn,
    part and character span, read from the rendered text's offsets."""

    tokenizer: Any

    def __init__(self) -> None:
        super().__init__()
        self._chat_template_kwargs: dict[str, Any] = {}
        self._content_parts: dict[str, bool] = {}  # chat template -> reads parts only

    @property
    def chat_template_kwargs(self) -> dict[str, Any]:
        """Keywords passed to every ``apply_chat_template`` call."""
        return self._chat_template_kwargs

    @chat_template_kwargs.setter
    def chat_template_kwargs(self, value: dict[str, Any] | None) -> None:
        self._chat_template_kwargs = template_kwargs(value)

    def encode(self, chat: Chat | Sequence[Any]) -> EncodedChat:
        """Render the chat with the tokenizer's chat template (generation prompt
        appended) and record, for each token, its turn, part and character span.

        Args:
            chat (Chat or list of dict): the chat.

        Returns:
            EncodedChat: the position table.
        """
        return self.encode_prompt(chat)

    def encode_prompt(
        self,
        chat: Chat | Sequence[Any],
        answer: str | None = None,
        answer_keys: Mapping[str, Any] | None = None,
    ) -> EncodedChat:
        """As :meth:`encode`; before a given ``answer``, the prompt is what the
        template renders before that answer's text when it begins with the
        generation prompt: Qwen3's template, thinking on, renders a given answer
        after an empty ``<think>`` block that its generation prompt lacks (or
        after the answer's ``reasoning_content``), and the model reads the
        answer after that block.

        Args:
            chat (Chat or list of dict): the chat before the answer.
            answer (str, optional): the answer to explain. Default: None
            answer_keys (dict, optional): the answer message's other keys
                (``reasoning_content``), for the template. Default: None

        Returns:
            EncodedChat: the position table.
        """
        template = str(getattr(self.tokenizer, "chat_template", None) or "")
        pinned = "date_string" in self.chat_template_kwargs and "date_string" in template
        if "strftime_now" in template and not pinned:
            warn_caller(  # Llama 3.1-3.3's, gpt-oss's: the prompt is not a function of the chat
                "the chat template writes today's date into the prompt (strftime_now): values, "
                "and a coalition store, change with the day; pin it with chat_template_kwargs="
                "{'date_string': '26 Jul 2024'} where the template reads one (Llama 3.1-3.3), "
                "else write a date into tokenizer.chat_template"
            )
        chat = as_chat(chat)
        self.check_text(chat)
        if chat.has_audio:
            raise InvalidContentError(
                "HFCausalLMAdapter reads text only; use LFM2AudioAdapter for chats with audio"
            )
        if not getattr(self.tokenizer, "is_fast", False):
            raise InvalidModelError(
                "HFCausalLMAdapter needs a fast tokenizer (for character offsets); load it "
                "with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        # Parts of a turn are joined by newlines into the message content.
        contents = ["\n".join(p.text for p in t.parts) for t in chat]  # type: ignore[union-attr]
        messages = [
            {"role": t.role, "content": c, **t.extra} for t, c in zip(chat, contents, strict=True)
        ]
        rendered = self._render(messages, generation_prompt=True)
        space = ""  # spaces the template writes between the prompt and the answer
        if answer is not None:
            answer_message = {**(answer_keys or {}), "role": "assistant", "content": answer}
            self._warn_on_unread_keys([*messages, answer_message], generation_prompt=False)
            rendered, space = self._answer_lead(messages, answer_message, rendered)
        else:
            self._warn_on_unread_keys(messages, generation_prompt=True)
        located = locate_contents(self._render, messages, rendered)
        turn_spans = self._turn_spans(messages, rendered, located)

        # (turn, part, start, end) in `rendered`, and where an escaped part's characters begin
        spans: list[tuple[int, int, int, int, list[int] | None]] = []
        part_texts: dict[tuple[int, int], str] = {}
        for ti, turn in enumerate(chat):
            c_start, c_end, trimmed = located[ti]
            if trimmed == REWRITTEN:  # what the model reads is what is explained
                read = rendered[c_start:c_end]
                warn_caller(
                    f"the chat template rewrites turn {ti}: {contents[ti][:40]!r} is read as "
                    f"{read[:40]!r} (Qwen3's drops an earlier answer's <think> block); its "
                    "features are the words read"
                    + (", its parts read as one" if len(turn.parts) > 1 else "")
                )
                part_texts.update({(ti, pi): "" for pi in range(len(turn.parts))})
                part_texts[(ti, 0)] = read
                spans.append((ti, 0, c_start, c_end, None))
                continue
            # Where each character of the content begins in `rendered` (and its end);
            # an escaped one is explained as given, read where its escapes lie.
            escaped = trimmed == ESCAPED
            starts: Sequence[int] = (
                list(accumulate(map(len, json_escapes(contents[ti])), initial=c_start))
                if escaped
                else range(c_start - trimmed, c_start - trimmed + len(contents[ti]) + 1)
            )
            cursor = 0
            for pi, part in enumerate(turn.parts):
                text = part.text  # type: ignore[union-attr]
                own = starts[cursor : cursor + len(text) + 1]
                cursor += len(text) + 1  # the joining newline
                # A template that trims the content cuts the outer parts' edges.
                p_start, p_end = max(own[0], c_start), min(own[-1], c_end)
                if escaped:
                    part_texts[(ti, pi)] = text
                    if text:
                        spans.append((ti, pi, p_start, p_end, [a - p_start for a in own]))
                    continue
                part_texts[(ti, pi)] = rendered[p_start:p_end] if p_end > p_start else ""
                if p_end > p_start:
                    spans.append((ti, pi, p_start, p_end, None))

        enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        self.check_token_ids(ids)
        offsets = list(enc["offset_mapping"])
        # Template tokens are never content; <unk> stands for content characters a
        # vocabulary without byte fallback lacks (control tokens typed in a content raised).
        special_ids = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        table = PositionTableBuilder()
        table.part_texts = part_texts
        for i, (s, e) in enumerate(offsets):
            # A token belongs to the turn whose own span (header, content, end
            # tokens) holds its first character; inserted template text to none.
            t_at = next((k for k, (a, b) in enumerate(turn_spans) if a <= s < b), -1)
            p_at, span = -1, (-1, -1)
            if ids[i] not in special_ids:
                for ti, pi, ps, pe, escapes in spans:
                    if s < pe and e > ps:  # token overlaps the part
                        t_at, p_at, span = ti, pi, (max(s, ps) - ps, min(e, pe) - ps)
                        if escapes is not None:  # the characters whose escapes it holds
                            span = (
                                bisect.bisect_right(escapes, span[0]) - 1,
                                bisect.bisect_left(escapes, span[1]),
                            )
                        break
            table.add_token(ids[i], t_at, p_at, span, label=rendered[s:e])
        encoded = table.build([t.role for t in chat], self.tokenizer)
        if answer is not None and space and self._ids_after(rendered + space, ids, answer):
            # A byte-level vocabulary reads Falcon's "Falcon: Rome" as " Rome", not
            # the "Rome" of the answer alone (a token the model never says there).
            encoded.state["answer_lead"] = (rendered + space, ids)
        return encoded

    def _ids_after(self, lead: str, lead_ids: list[int], text: str) -> list[int] | None:
        """``text``'s ids as the tokenizer reads them after ``lead`` (whose ids are
        ``lead_ids``), or None where the two do not tokenize apart."""
        after = list(self.tokenizer(lead + text, add_special_tokens=False)["input_ids"])
        if after[: len(lead_ids)] != lead_ids or len(after) == len(lead_ids):
            return None
        return after[len(lead_ids) :]

    def answer_response(self, encoded: EncodedChat, text: str) -> Response:
        """``text`` read as an answer after ``encoded``'s prompt: with the
        spaces the template writes before a given answer (see
        :meth:`encode_prompt`); a foil (:class:`~captum_mllm.ContrastiveTarget`)
        is read with the same spaces as the answer it is weighed against."""
        lead = encoded.state.get("answer_lead")
        ids = self._ids_after(lead[0], lead[1], text) if lead is not None else None
        if ids is None:
            return self.text_response(text)
        self.check_token_ids(ids)
        return self.response(torch.tensor(ids))

    def _render(
        self,
        messages: list[dict[str, Any]],
        generation_prompt: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ChatTemplateError(
                f"{type(self.tokenizer).__name__} has no chat template (a base model, not a "
                "chat model?): set tokenizer.chat_template, or explain a plain prompt with "
                "Captum's TextTemplateInput"
            )
        import jinja2

        kwargs = self.chat_template_kwargs if template_kwargs is None else template_kwargs
        try:
            if self._reads_content_parts():
                messages = [as_parts(m) for m in messages]
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
            )
        except jinja2.TemplateError as exc:  # e.g. raise_exception("System role not supported")
            hint = ""
            if any(m.get("role") == "system" for m in messages):  # the usual refusal (Gemma's)
                hint = (
                    " (a template without a system role takes the system prompt inside the "
                    "first user turn)"
                )
            raise ChatTemplateError(
                f"the model's chat template refuses this chat: {exc}{hint}"
            ) from exc

    def _reads_content_parts(self) -> bool:
        """Whether the chat template reads a message's text only from a list of
        parts (``[{"type": "text", "text": ...}]``, as SmolVLM's and Llama 3.2
        Vision's do) and renders a plain string content to nothing."""
        template = str(self.tokenizer.chat_template)  # a dict of named ones too
        known = self._content_parts
        if template not in known:  # once per template: a caller may set another one

            def reads(message: dict[str, Any]) -> bool:
                try:
                    rendered = self.tokenizer.apply_chat_template(
                        [message], tokenize=False, **self.chat_template_kwargs
                    )
                except Exception:  # the template's own error shows on the real chat
                    return False
                return SENTINEL in rendered

            plain = {"role": "user", "content": SENTINEL}
            known[template] = not reads(plain) and reads(as_parts(plain))
        return known[template]

    def _warn_on_unread_keys(self, messages: list[dict[str, Any]], generation_prompt: bool) -> None:
        """Warn when the template renders the messages' keys beside role and
        content (a tool call, a reasoning), and the ``tools`` of
        ``chat_template_kwargs``, to nothing: the model never reads them."""
        keys = sorted({k for m in messages for k in m} - {"role", "content"})
        tools = bool(self.chat_template_kwargs.get("tools"))
        if not keys and not tools:
            return
        bare = [{"role": m["role"], "content": m["content"]} for m in messages]
        kwargs = {k: v for k, v in self.chat_template_kwargs.items() if k != "tools"}
        try:
            unread = self._render(bare, generation_prompt, kwargs) == self._render(
                messages, generation_prompt
            )
        except ChatTemplateError:  # a template that needs them reads them
            return
        if unread:
            named = [*keys, *(["tools (chat_template_kwargs)"] if tools else [])]
            warn_caller(
                f"the model's chat template renders none of {named}: the model reads this "
                "chat without them (its template may have no tool or reasoning format); "
                "give what it should read as content"
            )

    def _answer_lead(
        self, messages: list[dict[str, Any]], answer: dict[str, Any], prompt: str
    ) -> tuple[str, str]:
        """The generation prompt ``prompt`` and the text the template renders
        after it before the ``answer`` message's text in the whole chat, less
        the spaces just before the answer, and those spaces (Llama 2's and
        Falcon's, which a tokenizer reads as part of the answer's first token);
        ``prompt`` and no spaces when the whole chat does not begin with
        ``prompt`` (a template that renders the answer otherwise than it
        generates it)."""
        whole = [*messages, answer]
        try:
            rendered = self._render(whole)
            start = locate_contents(lambda m, _: self._render(m), whole, rendered)[-1][0]
        except ChatTemplateError:  # the template refuses, changes or drops a content
            return prompt, ""
        if not rendered.startswith(prompt):
            return prompt, ""
        lead = rendered[: max(len(prompt), len(rendered[:start].rstrip(" ")))]
        return lead, rendered[len(lead) : start]

    def _turn_spans(
        self,
        messages: list[dict[str, Any]],
        rendered: str,
        located: list[tuple[int, int, int]],
    ) -> list[tuple[int, int]]:
        """Character span of each turn's own text: its header, content and end tokens.

        Turn k ends where the rendering of the first k + 1 messages ends. Turn 0
        starts where its own block starts when it follows another turn, so text
        the template inserts before it (a default system prompt, a BOS token)
        belongs to no turn. A template that does not render prefixes as
        prefixes, or refuses one (Llama 3.1's, given tools, a system prompt
        without the user turn it writes them into), gets content-only turns.
        """
        contents = [(a, b) for a, b, _ in located]
        ends = []
        for k in range(len(messages)):
            try:
                head = self._render(messages[: k + 1])
            except ChatTemplateError:
                return contents
            if not rendered.startswith(head) or len(head) < located[k][1]:
                return contents
            ends.append(len(head))
        first = located[0][0]
        dummy = {"role": "user" if messages[0]["role"] == "system" else "system", "content": "x"}
        try:
            lead = self._render([dummy])
            block = self._render([dummy, messages[0]])[len(lead) :]
        except Exception:  # a template that refuses this order: content-only start
            block = ""
        if block and rendered[: ends[0]].endswith(block):
            first = ends[0] - len(block)
        return [(first if k == 0 else ends[k - 1], ends[k]) for k in range(len(messages))]
