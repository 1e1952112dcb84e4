"""Captum interpretable inputs over chats.

:class:`ChatInput` reads an adapter's position table and decides which
positions form which interpretable feature. Captum perturbs ``ones(1, n)``;
``to_model_input`` turns a batch of coalitions into a :class:`MaskedChat`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import InterpretableInput
from torch import Tensor

from captum_mllm.chat import ROLES, AudioPart, Chat, as_chat
from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import CaptumMLLMError, InvalidGroupsError, NoFeaturesError

TEXT_UNITS = ("token", "word", "turn")
AUDIO_BASELINES = ("drop", "embedding", "silence")
# (positions, label, time span for audio features)
_Found = tuple[tuple[int, ...], str, tuple[float, float] | None]
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")


@dataclass(frozen=True)
class FeatureInfo:
    """What one interpretable feature is.

    Attributes:
        label (str): readable label (also in ``ChatInput.values``).
        modality (str): ``"text"``, ``"audio_in"`` or ``"mixed"``.
        turn (int): chat turn index (the first one for merged groups).
        role (str): that turn's role.
        positions (tuple of int): model positions the feature covers.
        clip (int): index of the audio clip (in chat order) for audio features, else -1.
        time (tuple of float or None): start and end second inside the clip.
    """

    label: str
    modality: str
    turn: int
    role: str
    positions: tuple[int, ...]
    clip: int = -1
    time: tuple[float, float] | None = None


class ChatInput(InterpretableInput):
    """A chat whose parts (tokens, words or whole turns) are Captum features.

    Args:
        chat (Chat or list of dict): the chat, or a Hugging Face message list.
        model (ModelAdapter): the adapter that will run it; encodes the chat.
        roles (tuple of str, optional): roles whose turns hold features.
            Default: ``("user",)``
        text_unit (str, optional): ``"token"``, ``"word"`` or ``"turn"``.
            Default: ``"word"``
        skip (tuple of str, optional): what is never a feature: ``"punctuation"``
            (tokens/words of punctuation and space only) and ``"special"``
            (special and template tokens; always left out except by ``"turn"``),
            plus any literal token or word strings. Default: ``("punctuation", "special")``
        groups (list, optional): one group id per feature (after skipping), like
            Captum's ``mask``: features sharing an id are perturbed together.
            Default: None
        text_baseline (str, int, optional): ``"drop"`` removes absent tokens from
            the sequence (Captum's empty-string baseline); ``"replace"`` puts the
            pad (or unk) token in their place; an int or token string replaces
            with that token. Default: ``"drop"``
        audio_unit (str, float or list, optional): ``"frame"`` (one 80 ms model
            position), a window in seconds (e.g. ``0.5``), ``"turn"`` (the whole
            clip), or explicit spans ``[(start_s, end_s, label), ...]`` (a
            position belongs to the span holding its midpoint; positions outside
            every span stay fixed), or ``"word"``: spans of the transcript's words
            found by ``aligner`` (labels ``♪word``). Default: ``0.5``
        audio_baseline (str, optional): ``"drop"`` removes absent audio
            positions; ``"embedding"`` replaces their encoder outputs with
            ``audio_fill`` (zeros by default), the clip encoded once;
            ``"silence"`` zeroes their samples and re-encodes the clip (slower:
            one encoder call per distinct silenced clip). Default: ``"drop"``
        audio_fill (Tensor, optional): the ``"embedding"`` baseline vector.
        aligner (ForcedAligner, optional): aligns transcripts for ``audio_unit="word"``.
        transcripts (str or list of str, optional): what each clip says, in
            chat order, for ``audio_unit="word"``.

    Examples::

        >>> inp = ChatInput(Chat().system("Be brief.").user("Who are you?"), model)
        >>> inp.values
        ['Who', 'are', 'you']
        >>> inp.to_tensor()
        tensor([[1., 1., 1.]])
        >>> masked = inp.to_model_input(torch.tensor([[1, 0, 1]]))  # drop "are"
    """

    def __init__(
        self,
        chat: Chat | Sequence[Any],
        model: Any,
        roles: Sequence[str] = ("user",),
        text_unit: str = "word",
        skip: Sequence[str] = ("punctuation", "special"),
        groups: Sequence[Hashable] | None = None,
        text_baseline: str | int = "drop",
        audio_unit: str | float | Sequence[tuple[float, float, str]] = 0.5,
        audio_baseline: str = "drop",
        audio_fill: Tensor | None = None,
        aligner: Any = None,
        transcripts: str | Sequence[str] | None = None,
    ) -> None:
        self.chat = as_chat(chat)
        self.model = model
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise CaptumMLLMError(f"unknown roles {unknown}; use some of {ROLES}")
        if text_unit not in TEXT_UNITS:
            raise CaptumMLLMError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
        if audio_baseline not in AUDIO_BASELINES:
            raise CaptumMLLMError(f"audio_baseline must be one of {AUDIO_BASELINES}")
        self.roles = tuple(roles)
        self.text_unit = text_unit
        self.audio_unit = audio_unit
        self.audio_baseline = audio_baseline
        self.audio_fill = audio_fill
        self.aligner = aligner
        self.transcripts = [transcripts] if isinstance(transcripts, str) else transcripts
        self.skip = tuple(skip)
        self.encoded: EncodedChat = model.encode(self.chat)

        found = sorted(self._text_features() + self._audio_features(), key=lambda f: min(f[0]))
        if groups is not None:
            found = _merge_groups(found, groups)
        if not found:
            raise NoFeaturesError(
                f"no features left in turns with roles {self.roles} after skipping {self.skip}; "
                "widen roles=, or change text_unit= / skip="
            )

        self.feature_of_position = torch.full((len(self.encoded),), -1, dtype=torch.long)
        for f, (positions, _, _) in enumerate(found):
            self.feature_of_position[list(positions)] = f
        self.features = [self._info(*f) for f in found]
        self.values: list[str] = [f.label for f in self.features]
        self.n_itp_features = len(self.values)
        self.baseline, self.replace_id = self._baseline(text_baseline)
        touched = (self.feature_of_position >= 0).nonzero()
        # Leading positions no feature touches: adapters compute them once.
        self.prefix_len = int(touched[0])

    # Captum's InterpretableInput ---------------------------------------------------

    def to_tensor(self) -> Tensor:
        """``ones(1, n_features)``: every feature present."""
        return torch.ones(1, self.n_itp_features)

    def to_model_input(self, perturbed_tensor: Tensor | None = None) -> MaskedChat:
        """Apply B coalitions to the chat.

        Args:
            perturbed_tensor (Tensor, optional): ``(B, n_features)``, nonzero =
                present. None means the full chat.

        Returns:
            MaskedChat: ``present`` of shape ``(B, n_positions)``.
        """
        if perturbed_tensor is None:
            perturbed_tensor = self.to_tensor()
        coalitions = perturbed_tensor.reshape(-1, self.n_itp_features).detach().cpu() != 0
        fixed = self.feature_of_position < 0
        # (B, n_features) -> (B, L): a position is present if fixed or its feature is
        present = fixed[None] | coalitions[:, self.feature_of_position.clamp(min=0)]
        return MaskedChat(
            self.encoded,
            present,
            self.baseline,
            self.replace_id,
            self.prefix_len,
            self.audio_baseline,
            self.audio_fill,
        )

    def format_attr(self, itp_attr: Tensor) -> Tensor:
        return itp_attr

    # Feature construction -------------------------------------------------------------

    def _text_features(self) -> list[_Found]:
        enc = self.encoded
        chosen = [t for t, role in enumerate(enc.roles) if role in self.roles]
        found: list[_Found] = []
        for turn in chosen:
            in_turn = (enc.turn == turn).nonzero().flatten().tolist()
            content = [p for p in in_turn if enc.part[p] >= 0 and enc.modality[p] == "text"]
            if self.text_unit == "turn":
                bos = getattr(self.model.tokenizer, "bos_token_id", None)
                whole = tuple(p for p in in_turn if not (p == 0 and int(enc.input_ids[p]) == bos))
                if whole:
                    found.append((whole, f"[{enc.roles[turn]} {turn}]", None))
                continue
            if self.text_unit == "token":
                groups = [([p], enc.tokens[p]) for p in content]
            else:
                groups = self._words(content)
            for members, text in groups:
                if not self._skipped(text):
                    found.append((tuple(members), text.strip(), None))
        return found

    def _audio_features(self) -> list[_Found]:
        """Group each chosen clip's positions by ``audio_unit``."""
        enc = self.encoded
        if enc.clip is None or self.text_unit == "turn":
            return []  # whole turns already hold their audio
        assert enc.audio_time is not None
        found: list[_Found] = []
        for c in sorted(set(enc.clip.tolist()) - {-1}):
            positions = (enc.clip == c).nonzero().flatten().tolist()
            if enc.roles[int(enc.turn[positions[0]])] not in self.roles:
                continue
            times = enc.audio_time[positions]
            end = float(times[-1, 1])
            groups: dict[int, list[int]] = {}
            spans: dict[int, tuple[float, float, str | None]] = {}
            unit = self._word_spans(c) if self.audio_unit == "word" else self.audio_unit
            for p, (t0, t1) in zip(
                positions, times.double().round(decimals=4).tolist(), strict=True
            ):
                key = _audio_group(unit, t0, t1, p, end)
                if key is None:
                    continue
                groups.setdefault(key, []).append(p)
                spans[key] = _audio_span(unit, key, t0, t1, end, spans.get(key))
            for key in sorted(groups):
                start, stop, label = spans[key]
                found.append(
                    (tuple(groups[key]), label or f"audio[{start:.2f}-{stop:.2f}s]", (start, stop))
                )
        return found

    def _words(self, content: list[int]) -> list[tuple[list[int], str]]:
        """Group content tokens by the word their first non-space character falls in.

        A whitespace-only token joins the word after it, so that dropping a word
        drops its leading space too (as a template value ``" word"`` would).
        """
        enc = self.encoded
        words = {k: list(_WORD.finditer(text)) for k, text in enc.part_texts.items()}
        groups: dict[tuple[int, int, int], list[int]] = {}
        texts: dict[tuple[int, int, int], str] = {}
        pending: list[int] = []
        part = None
        for p in content:
            key_part = (int(enc.turn[p]), int(enc.part[p]))
            if key_part != part:  # leading space never crosses into another part
                part, pending = key_part, []
            text = enc.part_texts[key_part]
            start, end = int(enc.char_start[p]), int(enc.char_end[p])
            while start < end and text[start].isspace():
                start += 1
            if start == end:
                pending.append(p)
                continue
            m = next((m for m in words[key_part] if m.start() <= start < m.end()), None)
            if m is not None:
                key = (*key_part, m.start())
                groups.setdefault(key, []).extend([*pending, p])
                texts[key] = m.group()
            pending = []
        return [(groups[k], texts[k]) for k in sorted(groups)]

    def _word_spans(self, clip: int) -> list[tuple[float, float, str]]:
        """Aligned word spans of one clip, labelled ``♪word``."""
        if self.aligner is None or self.transcripts is None or clip >= len(self.transcripts):
            raise CaptumMLLMError(
                'audio_unit="word" needs aligner=ForcedAligner(...) and one transcript per clip'
            )
        parts = [p for turn in self.chat for p in turn.parts if isinstance(p, AudioPart)]
        part = parts[clip]
        spans = self.aligner.align(part.waveform, part.sample_rate, self.transcripts[clip])
        return [(start, end, f"♪{word}") for start, end, word in spans]

    def _skipped(self, text: str) -> bool:
        stripped = text.strip()
        if not stripped:
            return True
        if "punctuation" in self.skip and all(
            unicodedata.category(c).startswith(("P", "S")) or c.isspace() for c in stripped
        ):
            return True
        return stripped in self.skip or text in self.skip

    def _info(
        self, positions: tuple[int, ...], label: str, time: tuple[float, float] | None
    ) -> FeatureInfo:
        enc = self.encoded
        modalities = {enc.modality[p] for p in positions}
        turn = int(enc.turn[positions[0]])
        clips = {int(enc.clip[p]) for p in positions} - {-1} if enc.clip is not None else set()
        return FeatureInfo(
            label=label,
            modality=modalities.pop() if len(modalities) == 1 else "mixed",
            turn=turn,
            role=enc.roles[turn] if turn >= 0 else "",
            positions=positions,
            clip=clips.pop() if len(clips) == 1 else -1,
            time=time,
        )

    def _baseline(self, text_baseline: str | int) -> tuple[str, int | None]:
        if text_baseline == "drop":
            return "drop", None
        tok = self.model.tokenizer
        if text_baseline == "replace":
            token_id = getattr(tok, "pad_token_id", None)
            if token_id is None:
                token_id = getattr(tok, "unk_token_id", None)
            if token_id is None:
                raise CaptumMLLMError("the tokenizer has no pad or unk token; pass a token id")
            return "replace", int(token_id)
        if isinstance(text_baseline, int):
            return "replace", text_baseline
        token_id = tok.convert_tokens_to_ids(text_baseline)
        if token_id is None or token_id == getattr(tok, "unk_token_id", object()):
            raise CaptumMLLMError(f"baseline token {text_baseline!r} is not in the vocabulary")
        return "replace", int(token_id)


def _audio_group(unit: Any, t0: float, t1: float, position: int, end: float) -> int | None:
    """Feature key of an audio position under ``audio_unit`` (None: stays fixed).

    A position belongs to the window or span holding its midpoint; the last
    position may reach past the clip's end (the encoder pads), so its midpoint
    is kept inside the clip.
    """
    if unit == "frame":
        return position
    if unit == "turn":
        return 0
    if isinstance(unit, int | float) and not isinstance(unit, bool):
        if unit <= 0:
            raise CaptumMLLMError("an audio window must be a positive number of seconds")
        return int(min((t0 + t1) / 2, end - 1e-6) // unit)
    if isinstance(unit, Sequence) and not isinstance(unit, str):
        middle = (t0 + t1) / 2
        for i, span in enumerate(unit):
            if span[0] <= middle < span[1]:
                return i
        return None
    raise CaptumMLLMError(
        f"audio_unit must be 'frame', 'turn', seconds or a list of spans, got {unit!r}"
    )


def _audio_span(
    unit: Any,
    key: int,
    t0: float,
    t1: float,
    end: float,
    seen: tuple[float, float, str | None] | None,
) -> tuple[float, float, str | None]:
    """(start, end, label) of an audio feature, growing as positions join it."""
    if isinstance(unit, Sequence) and not isinstance(unit, str):
        start, stop, *label = unit[key]
        return float(start), float(min(stop, end)), (label[0] if label else None)
    if seen is None:
        return t0, t1, None
    return seen[0], t1, None


def _merge_groups(found: list[_Found], groups: Sequence[Hashable]) -> list[_Found]:
    """Merge features sharing a group id (Captum's ``mask``); merged ones lose
    their single time span."""
    if len(groups) != len(found):
        raise InvalidGroupsError(
            f"groups has {len(groups)} ids but there are {len(found)} features "
            f"({[label for _, label, _ in found]}); give one group id per feature"
        )
    merged: dict[Hashable, list[_Found]] = {}
    for g, feature in zip(groups, found, strict=True):
        merged.setdefault(g, []).append(feature)
    out: list[_Found] = []
    for members in merged.values():
        positions = tuple(sorted(p for m in members for p in m[0]))
        label = " ".join(m[1] for m in members)
        out.append((positions, label, members[0][2] if len(members) == 1 else None))
    return out
