"""Model-agnostic chats: turns with a role, holding text and audio parts.

A :class:`Chat` is what the user builds; adapters encode it for their model.
Hugging Face message lists convert both ways.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from captum_mllm.errors import (
    AudioError,
    EmptyChatError,
    EmptyTextError,
    InvalidContentError,
    InvalidRoleError,
    warn_caller,
)

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
#: Message keys beside role and content that chat templates read, as arguments.
_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "reasoning", "thinking")
#: What to use instead of roles other APIs and templates know.
_ROLE_HINTS = {
    "developer": " (OpenAI's developer role is the system prompt: use 'system')",
    "model": " (Gemma's model turn is the assistant's: use 'assistant')",
    **{r: " (a tool's output is a 'tool' turn)" for r in ("function", "ipython")},
}


@dataclass(frozen=True)
class TextPart:
    """A piece of text inside a turn.

    Args:
        text (str): the text; only a system turn may hold an empty one (chat
            templates accept an empty system message).
    """

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise InvalidContentError(
                f"text parts must be str, got {type(self.text).__name__}; "
                "convert the value with str() first"
            )


@dataclass(frozen=True, eq=False)
class AudioPart:
    """A clip of audio inside a turn.

    Holds a mono float waveform with its sample rate. Build it from a path,
    bytes, a numpy array or a tensor with :meth:`from_any` (reading and
    resampling live in :mod:`captum_mllm.audio`).

    Args:
        waveform (Tensor): mono samples, shape ``(n_samples,)``.
        sample_rate (int): samples per second.
        source (str, optional): where the clip came from, for labels.
            Default: ``""``
    """

    waveform: torch.Tensor
    sample_rate: int
    source: str = ""

    @property
    def duration(self) -> float:
        """Length of the clip in seconds."""
        return self.waveform.shape[-1] / self.sample_rate

    @classmethod
    def from_any(cls, audio: Any, sample_rate: int | None = None) -> AudioPart:
        """Build an audio part from a path, bytes, array, tensor, a Hugging Face
        ``datasets`` Audio value or an AudioPart.

        Args:
            audio (str, Path, bytes, ndarray, Tensor, dict or AudioPart): the audio.
            sample_rate (int, optional): required for arrays and tensors; a
                file's header says its own (another value raises).

        Returns:
            AudioPart: the mono clip at its own sample rate.
        """
        if isinstance(audio, AudioPart):
            if sample_rate is not None and sample_rate != audio.sample_rate:  # went unread
                raise AudioError(
                    f"this AudioPart is {audio.sample_rate} Hz audio, not sample_rate="
                    f"{sample_rate}; leave sample_rate= out (clips are resampled for the model)"
                )
            return audio
        from captum_mllm.audio import load_audio

        waveform, sr, source = load_audio(audio, sample_rate)
        return cls(waveform, sr, source)


Part = TextPart | AudioPart


def _text_part(text: Any) -> TextPart:
    if isinstance(text, TextPart):
        return text
    if isinstance(text, AudioPart | np.ndarray | torch.Tensor | bytes):
        # the first argument is the text: a clip there was refused with "use str()"
        raise InvalidContentError(
            f"text is a str or a list of str, got {type(text).__name__}: audio goes in "
            "audio=, e.g. Chat().user('What is said?', audio=clip, sample_rate=16000)"
        )
    if not isinstance(text, str):
        raise InvalidContentError(
            f"text must be a str or a list of str, got {type(text).__name__}; "
            "convert the value with str() first"
        )
    return TextPart(text)


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | tuple | dict) and not value)


def _parse_arguments(call: Any) -> None:
    """A tool call's ``arguments`` as transformers' templates read them: a dict.
    OpenAI's format holds a JSON string, which a template's ``| tojson`` wrote
    as one quoted string; vLLM parses it before the template, and so do we
    (``""`` or None as ``{}``). A string that is not a JSON object stays, with a warning."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str | None):
        return
    text = function.get("arguments")
    if not text:
        function["arguments"] = {}
        return
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        function["arguments"] = parsed
    else:
        warn_caller(
            f"tool call {function.get('name')!r} has arguments that are not a JSON object "
            f"({text[:40]!r}); the template gets them as this string"
        )


@dataclass(frozen=True)
class Turn:
    """One message of a chat: a role and its ordered parts.

    Args:
        role (str): ``"system"``, ``"user"``, ``"assistant"`` or ``"tool"`` (a
            tool's output).
        parts (tuple of TextPart / AudioPart): the content, in order.
        extra (dict, optional): the message's other keys, which a chat template
            reads (``tool_calls``, ``tool_call_id``, ``name``,
            ``reasoning_content``); never features. An assistant turn holding
            ``tool_calls`` may have no parts. Default: ``{}``
    """

    role: str
    parts: tuple[Part, ...] = field(default_factory=tuple)
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            hint = _ROLE_HINTS.get(str(self.role), "")
            raise InvalidRoleError(
                f"unknown role {self.role!r}; use one of {', '.join(ROLES)}{hint}"
            )
        if not isinstance(self.extra, Mapping) or {"role", "content"} & set(self.extra):
            raise InvalidContentError("a turn's extra= holds message keys beside role and content")
        calls = self.extra.get("tool_calls")
        if calls is not None and (
            not isinstance(calls, list | tuple) or not all(isinstance(c, Mapping) for c in calls)
        ):  # templates loop over dicts: a string rendered letter by letter
            raise InvalidContentError(
                "tool_calls must be a list of dicts, as "
                '[{"type": "function", "function": {"name": ..., "arguments": {...}}}]'
            )
        object.__setattr__(self, "extra", copy.deepcopy(dict(self.extra)))  # immutable, as parts
        for call in self.extra.get("tool_calls") or ():
            _parse_arguments(call)
        if not self.parts and not (self.role == "assistant" and self.extra.get("tool_calls")):
            raise EmptyChatError(f"the {self.role} turn has no content; give it text or audio")
        for part in self.parts:
            if not isinstance(part, TextPart | AudioPart):
                raise InvalidContentError(
                    f"turn parts must be TextPart or AudioPart, got {type(part).__name__}"
                )
            if isinstance(part, TextPart) and not part.text.strip() and self.role != "system":
                raise EmptyTextError(
                    f"a text part of the {self.role} turn is empty; drop the part or give it text"
                )

    @property
    def text(self) -> str:
        """The turn's text parts joined (audio parts are left out)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


class Chat(Sequence[Turn]):
    """An immutable conversation of system, user and assistant turns.

    Built fluently; each call returns a new chat.

    Examples::

        >>> chat = (Chat()
        ...         .system("Respond briefly.")
        ...         .user("What is the capital of France?"))
        >>> chat.to_messages()[1]
        {'role': 'user', 'content': [{'type': 'text', 'text': 'What is the capital of France?'}]}
        >>> Chat.from_messages([{"role": "user", "content": "Hi"}])[0].text
        'Hi'
    """

    def __init__(self, turns: Iterable[Turn] = ()) -> None:
        self._turns: tuple[Turn, ...] = tuple(turns)
        for turn in self._turns:
            if not isinstance(turn, Turn):
                raise InvalidContentError(f"a chat holds Turn objects, got {type(turn).__name__}")

    def add(
        self,
        role: str,
        text: str | Sequence[str] | None = None,
        audio: Any = None,
        sample_rate: int | None = None,
        **extra: Any,
    ) -> Chat:
        """Return a new chat with one more turn.

        Audio comes before text inside the turn, as LFM2-Audio's chat format has it.

        Args:
            role (str): ``"system"``, ``"user"`` or ``"assistant"``.
            text (str, TextPart or a list of them, optional): text part(s); audio goes
                in ``audio=``.
            audio (path, bytes, array, Tensor, AudioPart or list of them, optional):
                audio part(s); a list of numbers is one waveform. Default: None
            sample_rate (int, optional): sample rate for array / tensor audio.
            **extra: the message's other keys, for the chat template:
                ``tool_calls=[...]``, ``tool_call_id=``, ``name=``,
                ``reasoning_content=``, ``reasoning=``, ``thinking=`` (others through
                :meth:`from_messages`); see :class:`Turn`.

        Returns:
            Chat: the extended chat.
        """
        unknown = sorted(set(extra) - set(_MESSAGE_KEYS))
        if unknown:  # a misspelt argument (sampling_rate=) would reach the template unread
            raise TypeError(
                f"Chat.add() got unexpected keyword arguments {unknown}; message keys it "
                f"takes: {', '.join(_MESSAGE_KEYS)} (any other through Chat.from_messages)"
            )
        parts: list[Part] = []
        if audio is not None:
            from captum_mllm.audio import is_samples

            several = isinstance(audio, list | tuple) and not is_samples(audio)
            clips = audio if several else [audio]
            parts += [AudioPart.from_any(a, sample_rate) for a in clips]
        if text is not None:
            texts = list(text) if isinstance(text, list | tuple) else [text]
            parts += [_text_part(t) for t in texts]
        return Chat((*self._turns, Turn(role, tuple(parts), extra)))

    def system(self, text: str | Sequence[str] | None = None, **kwargs: Any) -> Chat:
        """Add a system turn. See :meth:`add`."""
        return self.add("system", text, **kwargs)

    def user(self, text: str | Sequence[str] | None = None, **kwargs: Any) -> Chat:
        """Add a user turn. See :meth:`add`."""
        return self.add("user", text, **kwargs)

    def assistant(self, text: str | Sequence[str] | None = None, **kwargs: Any) -> Chat:
        """Add an assistant turn. See :meth:`add`."""
        return self.add("assistant", text, **kwargs)

    def tool(self, text: str | Sequence[str] | None = None, **kwargs: Any) -> Chat:
        """Add a tool's output (``tool_call_id=`` or ``name=`` where the template
        reads one). See :meth:`add`."""
        return self.add("tool", text, **kwargs)

    def validate(self) -> Chat:
        """Raise :class:`EmptyChatError` when the chat has no turns; return self."""
        if not self._turns:
            raise EmptyChatError("the chat has no turns; add one with .user(...)")
        return self

    def split_response(self) -> tuple[Chat, str | None]:
        """Split off a final assistant turn: the prompt, and the answer to explain.

        A chat that ends with the assistant's text turn asks to explain that
        answer; any other chat is a prompt whose answer is still to come.

        Returns:
            tuple: ``(prompt chat, answer text or None)``.

        Raises:
            EmptyChatError: the chat is only an assistant turn.
            InvalidContentError: the final assistant turn holds audio or
                ``tool_calls`` (its other keys, as ``reasoning_content``, reach
                the template before the answer).
        """
        self.validate()
        last = self._turns[-1]
        if last.role != "assistant":
            return self, None
        if any(isinstance(p, AudioPart) for p in last.parts):
            raise InvalidContentError(
                "the chat ends with a spoken assistant turn; remove it and pass the answer "
                "as target= instead"
            )
        if "tool_calls" in last.extra:  # the answer scored is text: the call would go unread
            raise InvalidContentError(
                "the chat ends with an assistant turn holding tool_calls; the answer to "
                "explain is text: end the chat before it (a call's text may be given as target=)"
            )
        if len(self._turns) == 1:
            raise EmptyChatError("the chat holds only the assistant's answer; add the prompt")
        return Chat(self._turns[:-1]), "\n".join(p.text for p in last.parts)  # type: ignore[union-attr]

    @property
    def has_audio(self) -> bool:
        return any(isinstance(p, AudioPart) for t in self._turns for p in t.parts)

    # Hugging Face message lists -------------------------------------------------

    @classmethod
    def from_messages(cls, messages: Iterable[Mapping[str, Any]]) -> Chat:
        """Build a chat from a Hugging Face message list.

        Keys other than ``role`` and ``content`` (``tool_calls``,
        ``tool_call_id``, ``name``, ``reasoning_content``) are kept for the chat
        template (:class:`Turn`'s ``extra``), unless None or empty (as an OpenAI
        SDK message's ``refusal``, ``annotations``); an assistant message holding
        ``tool_calls`` may have no content.
        ``content`` may be a string or a list of ``{"type": "text", "text": ...}``
        and ``{"type": "audio", "audio" | "path" | "url": ..., "sampling_rate": ...}``
        items, or OpenAI's ``{"type": "input_audio", "input_audio": {"data": base64}}``.
        ShareGPT's messages (``{"from": "human" | "gpt" | "system", "value": ...}``,
        as many Hugging Face data sets hold them) are read as those roles.

        Args:
            messages (list of dict): the messages.

        Returns:
            Chat: the chat.
        """
        if isinstance(messages, Mapping):  # iterating it would read its keys as messages
            raise InvalidContentError(
                f"a chat is a list of messages, got a mapping with keys {sorted(messages)} "
                "(a data set's row: give its 'messages' or 'conversations')"
            )
        if isinstance(messages, str):
            raise InvalidContentError(
                "a chat is a list of messages, got a str: give [{'role': 'user', 'content': "
                "...}] or use Chat().user(...)"
            )
        turns = []
        for message in messages:
            if isinstance(message, Mapping) and "role" not in message and "from" in message:
                message = _from_sharegpt(message)
            if not isinstance(message, Mapping) or "role" not in message:
                raise InvalidContentError("each message must be a dict with 'role' and 'content'")
            extra = {  # unset (an OpenAI SDK message's refusal=None, annotations=[]): left out
                str(key): v
                for key, v in message.items()
                if key not in ("role", "content") and not _unset(v)
            }
            content = message.get("content")
            empty = content is None or (isinstance(content, str | list) and not content)
            if empty and extra.get("tool_calls"):  # a call alone
                turns.append(Turn(message["role"], (), extra))
                continue
            if isinstance(content, str):
                turns.append(Turn(message["role"], (TextPart(content),), extra))
                continue
            if not isinstance(content, list):
                raise InvalidContentError(
                    "message content must be a str or a list of parts, "
                    f"got {type(content).__name__}"
                )
            parts = tuple(_part_from_dict(item) for item in content)
            turns.append(Turn(message["role"], parts, extra))
        return cls(turns)

    def to_messages(self) -> list[dict[str, Any]]:
        """Return the chat as a Hugging Face message list (audio as waveforms).

        Returns:
            list of dict: ``[{"role": ..., "content": [{"type": ...}, ...]}, ...]``.
        """
        out = []
        for turn in self._turns:
            content: list[dict[str, Any]] = []
            for p in turn.parts:
                if isinstance(p, TextPart):
                    content.append({"type": "text", "text": p.text})
                else:
                    content.append(
                        {
                            "type": "audio",
                            "audio": p.waveform.numpy(),
                            "sampling_rate": p.sample_rate,
                        }
                    )
            out.append({"role": turn.role, "content": content, **turn.extra})
        return out

    # Sequence protocol -----------------------------------------------------------

    def __getitem__(self, index: int) -> Turn:  # type: ignore[override]
        return self._turns[index]

    def __len__(self) -> int:
        return len(self._turns)

    def __iter__(self) -> Iterator[Turn]:
        return iter(self._turns)

    def __repr__(self) -> str:
        return f"Chat({list(self._turns)!r})"


#: ShareGPT's speakers (``{"from": "human", "value": ...}``, common in Hugging Face data sets).
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool",
}  # fmt: skip


def _from_sharegpt(message: Mapping[str, Any]) -> dict[str, Any]:
    """A ShareGPT message as a Hugging Face one."""
    speaker = message["from"]
    if speaker not in _SHAREGPT_ROLES:
        raise InvalidContentError(
            f"unknown ShareGPT speaker {speaker!r}; use one of {sorted(_SHAREGPT_ROLES)}"
        )
    rest = {k: v for k, v in message.items() if k not in ("from", "value")}
    return {"role": _SHAREGPT_ROLES[speaker], "content": message.get("value"), **rest}


def _part_from_dict(item: Any) -> Part:
    if not isinstance(item, Mapping) or "type" not in item:
        raise InvalidContentError("each content item must be a dict with a 'type'")
    kind = item["type"]
    if kind in ("text", "input_text", "output_text"):  # the last two: OpenAI's Responses API
        if "text" not in item:
            raise InvalidContentError(f"a text item needs a 'text' key; it has {sorted(item)}")
        return TextPart(item["text"])
    if kind in ("audio", "input_audio"):
        nested = item.get("input_audio")  # OpenAI's {"input_audio": {"data": base64, ...}}
        source = nested if isinstance(nested, Mapping) else item
        # The first key set: a datasets column fills the others' with None
        audio = next(
            (source[k] for k in ("audio", "path", "url", "data") if source.get(k) is not None),
            None,
        )
        if audio is None:
            raise InvalidContentError(
                "an audio item needs one of 'audio', 'path', 'url' or 'data' (base64)"
            )
        if isinstance(audio, str) and "data" in source and audio is source["data"]:
            try:  # it was read as a file name
                audio = base64.b64decode(audio, validate=True)
            except ValueError:
                raise InvalidContentError("an audio item's 'data' must be base64") from None
        if isinstance(audio, list):
            audio = np.asarray(audio, dtype=np.float32)
        return AudioPart.from_any(audio, item.get("sampling_rate") or item.get("sample_rate"))
    raise InvalidContentError(f"unknown content type {kind!r}; use 'text' or 'audio'")


def as_chat(chat: Chat | Iterable[Mapping[str, Any]]) -> Chat:
    """Accept a :class:`Chat` or a Hugging Face message list; return a validated Chat."""
    if not isinstance(chat, Chat):
        chat = Chat.from_messages(chat)
    return chat.validate()


#: The keys read from a chat request ``{"messages": [...], ...}``: an OpenAI
#: request's messages and tools, and vLLM's ``chat_template_kwargs``.
REQUEST_KEYS = ("messages", "tools", "chat_template_kwargs")


def request_template_kwargs(request: Mapping[str, Any]) -> dict[str, Any]:
    """The chat-template arguments a request holds: its ``chat_template_kwargs``
    (e.g. ``{"enable_thinking": False}``; a None value is unset, as a datasets
    column fills another row's keys) and its ``tools``.

    Args:
        request (Mapping): ``{"messages": [...], "tools": [...], ...}``.

    Returns:
        dict: for ``tokenizer.apply_chat_template``; empty when it holds none.
    """
    given = request.get("chat_template_kwargs") or {}
    if not isinstance(given, Mapping):
        raise InvalidContentError(
            f"a request's chat_template_kwargs must be a mapping, got {type(given).__name__}"
        )
    # None is unset: passed, a template reads it as given (Llama 3's date "None")
    kwargs = {k: v for k, v in given.items() if v is not None}
    if request.get("tools") is not None:
        if "tools" in kwargs:
            raise InvalidContentError("a request gives tools twice: in tools and in its kwargs")
        kwargs["tools"] = request["tools"]
    return kwargs
