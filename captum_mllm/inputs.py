"""Captum interpretable inputs over chats.

:class:`ChatInput` reads an adapter's position table and decides which
positions form which interpretable feature. Captum perturbs ``ones(1, n)``;
``to_model_input`` turns a batch of coalitions into a :class:`MaskedChat`.
"""

from __future__ import annotations

import bisect
import collections
import difflib
import json
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import InterpretableInput
from torch import Tensor

from captum_mllm.audio_units import (
    ALIGNED_UNITS,
    audio_group,
    is_span_list,
    per_clip_spans,
    span_features,
)
from captum_mllm.chat import ROLES, AudioPart, Chat, as_chat
from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import (
    AlignmentError,
    InvalidBaselineError,
    InvalidGroupsError,
    InvalidModelError,
    InvalidOptionError,
    InvalidRoleError,
    InvalidSpanError,
    NoFeaturesError,
    warn_caller,
)
from captum_mllm.fingerprint import plain
from captum_mllm.models.base import OVERLAP, ModelAdapter
from captum_mllm.words import (
    is_punctuation,
    is_separator,
    sentence_spans,
    spoken_word_spans,
    strip_separators,
    word_spans,
)

TEXT_UNITS = ("token", "word", "sentence", "turn")
SKIP_KINDS = ("punctuation", "special")  # skip= names; anything else is a literal string
AUDIO_BASELINES = ("drop", "embedding", "silence")
#: Feature labels a ChatInput's repr shows.
REPR_LABELS = 8
# (positions, label, time span for audio features)
_Found = tuple[tuple[int, ...], str, tuple[float, float] | None]


@dataclass(frozen=True)
class FeatureInfo:
    """What one interpretable feature is.

    Attributes:
        label (str): readable label (also in ``ChatInput.values``).
        modality (str): ``"text"``, ``"audio_in"`` or ``"mixed"``.
        turn (int): chat turn index; -1 for a group across several turns.
        role (str): that turn's role; for a group across turns their shared
            role, or ``"mixed"``.
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
        text_unit (str, optional): ``"token"``, ``"word"``, ``"sentence"`` (see
            :func:`~captum_mllm.words.sentence_spans`) or ``"turn"``.
            Default: ``"word"``
        skip (str or tuple of str, optional): what is never a feature: ``"punctuation"``
            (tokens/words of punctuation and space only) and ``"special"``
            (special and template tokens; always left out except by ``"turn"``),
            plus any literal token or word strings (one that looks like a
            misspelt name and is not in the chat warns). Default:
            ``("punctuation", "special")``
        groups (list, optional): one group id per feature (after skipping), like
            Captum's ``mask``: features sharing an id are perturbed together.
            Default: None
        text_baseline (str, int, optional): ``"drop"`` removes absent tokens from
            the sequence (Captum's empty-string baseline); ``"replace"`` puts a
            neutral token in their place (the single-space token, else the unk
            token, never a special or control token); an int or token string
            replaces with that token. Default: ``"drop"``
        audio_unit (str, float or list, optional): ``"frame"`` (one 80 ms model
            position), a window in seconds (e.g. ``0.5``), ``"turn"`` (the whole
            clip), or explicit spans ``[(start_s, end_s, label), ...]``, not
            overlapping (a position belongs to the span holding its midpoint;
            positions outside every span stay fixed; with several clips, one such
            list per clip in chat order, an empty one leaving its clip out), or
            ``"word"``: spans of the transcript's words found by ``aligner``
            (labels ``♪word``), or ``"sentence"``: those words grouped by the
            transcript's sentences (see :func:`~captum_mllm.words.sentence_spans`).
            Default: ``0.5``
        audio_baseline (str, optional): ``"drop"`` removes absent audio
            positions; ``"embedding"`` replaces their encoder outputs with
            ``audio_fill`` (zeros by default), the clip encoded once;
            ``"silence"`` zeroes their samples and re-encodes the clip (slower:
            one encoder call per distinct silenced clip). Default: ``"drop"``
        audio_fill (Tensor, optional): the ``"embedding"`` baseline vector.
        aligner (ForcedAligner, optional): aligns transcripts for ``audio_unit="word"``
            or ``"sentence"``.
        transcripts (str or list of str, optional): what each clip says, in
            chat order, for ``audio_unit="word"`` or ``"sentence"``: exactly one per clip.
        allow_special_baseline (bool, optional): let ``text_baseline`` name a
            special or control token (e.g. the end-of-turn token), which
            templates give a meaning of its own. Default: False

    A chat that ends with an assistant text turn is a prompt plus the answer to
    explain: that turn is not encoded, its text is in ``response`` and is the
    default target of :class:`MultimodalLLMAttribution`.

    Words follow Unicode grapheme clusters: combining marks stay with their
    letter, emoji and other symbols are words, and zero-width or format
    characters separate words without ever forming a feature of their own.
    A Chinese character is a word of its own. A feature holds whole tokens:
    where one token spells several words (``"北京"``, or ``"you?"`` in some
    vocabularies) they are one feature, labelled with all of them.
    The ``"punctuation"`` filter drops punctuation only.

    Audio spans (``audio_unit`` spans or aligned words) too short to hold the
    middle of an 80 ms position merge with the following span (or the
    preceding one at the end of a clip); the feature's label names both.

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
        skip: str | Sequence[str] = ("punctuation", "special"),
        groups: Sequence[Hashable] | None = None,
        text_baseline: str | int = "drop",
        audio_unit: str | float | Sequence[Any] = 0.5,
        audio_baseline: str = "drop",
        audio_fill: Tensor | None = None,
        aligner: Any = None,
        transcripts: str | Sequence[str] | None = None,
        allow_special_baseline: bool = False,
    ) -> None:
        self.chat = as_chat(chat)
        self._arguments = {  # to read a target= answer as the chat's final turn
            "roles": roles,
            "text_unit": text_unit,
            "skip": skip,
            "groups": groups,
            "text_baseline": text_baseline,
            "audio_unit": audio_unit,
            "audio_baseline": audio_baseline,
            "audio_fill": audio_fill,
            "aligner": aligner,
            "transcripts": transcripts,
            "allow_special_baseline": allow_special_baseline,
        }
        if not isinstance(model, ModelAdapter):
            raise InvalidModelError(
                f"ChatInput needs a captum-mllm model adapter, got {type(model).__name__}; wrap "
                "a Hugging Face model as HFCausalLMAdapter(model, tokenizer)"
            )
        self.model = model
        roles = (roles,) if isinstance(roles, str) else tuple(roles)
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise InvalidRoleError(f"unknown roles {unknown}; use some of {ROLES}")
        if text_unit not in TEXT_UNITS:
            raise InvalidOptionError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
        if audio_baseline not in AUDIO_BASELINES:
            raise InvalidBaselineError(
                f"audio_baseline must be one of {AUDIO_BASELINES}, got {audio_baseline!r}"
            )
        # Settings another one leaves unread, as transcripts= without word units.
        if audio_fill is not None and audio_baseline != "embedding":
            raise InvalidBaselineError(
                f'audio_fill= is only read with audio_baseline="embedding", not {audio_baseline!r}'
            )
        if not _aligned(audio_unit) and not is_span_list(audio_unit):  # checked without audio
            audio_group(audio_unit, 0.0, 0.0, 0, 1.0)
        if aligner is not None and not _aligned(audio_unit):
            raise AlignmentError(
                f'aligner= is only read with audio_unit="word" or "sentence", not {audio_unit!r}'
            )
        self.roles = roles
        self.text_unit = text_unit
        self.audio_unit = audio_unit
        self.audio_baseline = audio_baseline
        self.audio_fill = audio_fill
        self.aligner = aligner
        self.transcripts = [transcripts] if isinstance(transcripts, str) else transcripts
        self.skip = (skip,) if isinstance(skip, str) else tuple(skip)  # as roles: not letters
        self._check_skip()
        # A final assistant turn is the answer to explain, not part of the prompt.
        self.prompt, self.response = self.chat.split_response()
        if self.response is not None:  # encode checks the prompt's text
            model.check_text(list(self.chat)[-1:])
        self._check_transcripts()
        with model.evaluating():  # an audio encoder in training mode: batch statistics
            keys = self.chat[-1].extra if self.response is not None else None
            self.encoded: EncodedChat = model.encode_prompt(self.prompt, self.response, keys)
        self._check_audio_fill()

        self._spoken_sentences: dict[int, list[float]] = {}  # clip -> when each sentence starts
        found = sorted(self._text_features() + self._audio_features(), key=lambda f: min(f[0]))
        if groups is not None:
            found = _merge_groups(found, groups)
        if not found:
            answer = (
                " (the chat's final assistant turn is the answer to explain, not a feature)"
                if self.response is not None and "assistant" in self.roles
                else ""
            )
            present = sorted({t.role for t in self.prompt}, key=ROLES.index)
            if not answer and not set(present) & set(self.roles):  # nothing was skipped
                raise NoFeaturesError(
                    f"the chat has no turn with roles {self.roles} (it has {present}): give "
                    "roles= among those"
                )
            raise NoFeaturesError(
                f"no features left in turns with roles {self.roles} after skipping {self.skip}"
                f"{answer}; widen roles=, or change text_unit= / skip="
            )

        self.feature_of_position = torch.full((len(self.encoded),), -1, dtype=torch.long)
        for f, (positions, _, _) in enumerate(found):
            self.feature_of_position[list(positions)] = f
        self.features = [self._info(*f) for f in found]
        self.values: list[str] = [f.label for f in self.features]
        self.n_itp_features = len(self.values)
        self.baseline, self.replace_id = self._baseline(text_baseline, allow_special_baseline)
        touched = (self.feature_of_position >= 0).nonzero()
        # Leading positions no feature touches: adapters compute them once.
        self.prefix_len = int(touched[0])

    def _check_audio_fill(self) -> None:
        """``audio_fill`` is one finite input-embedding vector (or a scalar)."""
        fill = self.audio_fill
        if fill is None:
            return
        if not isinstance(fill, Tensor) or not fill.is_floating_point():
            raise InvalidBaselineError(
                f"audio_fill must be a float tensor, got {type(fill).__name__}"
            )
        if not bool(torch.isfinite(fill).all()):
            raise InvalidBaselineError("audio_fill holds NaN or infinite values")
        try:
            width = self.model.input_embeddings(self.encoded).shape[-1]
        except NotImplementedError:
            width = None
        if fill.dim() > 1 or (fill.dim() == 1 and width is not None and len(fill) != width):
            raise InvalidBaselineError(
                f"audio_fill must be a scalar or one vector of the model's input width "
                f"({width}), got shape {tuple(fill.shape)}"
            )

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

    def feature_tree(self) -> list[Any]:
        """Features grouped turn -> part -> sentence (of a text part, see
        :func:`~captum_mllm.words.sentence_spans`, or of a clip's aligned
        transcript) -> feature, as nested lists of feature indices (levels with
        one member collapse): the tree of :class:`~captum_mllm.methods.HierarchicalShapley`.

        Examples::

            >>> inp.feature_tree()   # system words, then the user's clip and two sentences
            [[0, 1], [[2, 3, 4], [[5, 6], [7, 8]]]]
        """
        enc = self.encoded
        turns: dict[int, dict[Any, dict[int, list[int]]]] = {}
        across = []  # a group across turns (or parts) belongs to none: a node of its own
        starts = {k: [a for a, _ in sentence_spans(t)] for k, t in enc.part_texts.items()}
        for f, feature in enumerate(self.features):
            if feature.turn < 0:
                across.append(f)
                continue
            parts = {int(enc.part[p]) for p in feature.positions} - {-1}
            part = parts.pop() if len(parts) == 1 else ("across", f)
            sentence = 0
            if feature.modality == "text" and isinstance(part, int):
                text = enc.part_texts[(feature.turn, part)]
                first = min(p for p in feature.positions if int(enc.part[p]) == part)
                start = int(enc.char_start[first])  # its first visible character's sentence
                while start < len(text) - 1 and is_separator(text[start]):
                    start += 1
                sentence = bisect.bisect_right(starts[(feature.turn, part)], start)
            elif feature.clip in self._spoken_sentences and feature.time is not None:
                middle = (feature.time[0] + feature.time[1]) / 2  # a spoken word's sentence
                sentence = bisect.bisect_right(self._spoken_sentences[feature.clip], middle)
            sentences = turns.setdefault(feature.turn, {}).setdefault(part, {})
            sentences.setdefault(sentence, []).append(f)

        def collapse(node: list[Any]) -> Any:
            """A list of one member is that member."""
            node = [collapse(n) if isinstance(n, list) else n for n in node]
            return node[0] if len(node) == 1 else node

        tree = [
            collapse([list(sentences.values()) for sentences in parts.values()])
            for _, parts in sorted(turns.items())
        ] + across
        out = collapse(tree)
        return out if isinstance(out, list) else [out]

    def answered(self, answer: str) -> ChatInput:
        """This input with ``answer`` as the chat's final assistant turn, where the
        model's template renders a given answer after text its generation prompt
        lacks (Qwen3's empty ``<think>`` block): ``attribute(inp, target=answer)``
        then scores the answer where the chat ending with it does. The features
        are the same; otherwise this input itself.

        Args:
            answer (str): the answer to explain.

        Returns:
            ChatInput: the input whose prompt the answer follows.
        """
        if self.response is not None or not self.model.reads_answer_lead:
            return self
        # The prompt turns with their own (already checked, encoded) parts.
        whole = Chat([*self.prompt, *Chat().assistant(answer)])
        with warnings.catch_warnings():  # this chat's warnings were given when it was built
            warnings.simplefilter("ignore")
            other = ChatInput(whole, self.model, **self._arguments)
        same = torch.equal(other.encoded.input_ids, self.encoded.input_ids)
        return self if same and "answer_ids" not in other.encoded.state else other

    def __repr__(self) -> str:
        """What a notebook shows: the features, counted by modality, the first
        labels, and the settings that made them."""
        counts = collections.Counter(f.modality for f in self.features)
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        labels = ", ".join(repr(label) for label in self.values[:REPR_LABELS])
        extra = len(self.values) - REPR_LABELS
        more = f", ... ({extra} more)" if extra > 0 else ""
        return (
            f"{type(self).__name__}({len(self.features)} feature{'s' * (len(self.features) != 1)} "
            f"({kinds}): [{labels}{more}]; "
            f"roles={self.roles}, text_unit={self.text_unit!r}, audio_unit={self.audio_unit!r}, "
            f"model={type(self.model).__name__})"
        )

    def settings(self) -> dict[str, Any]:
        """The choices that made these features, as plain data (a result's
        ``provenance["input_settings"]``): the same chat explained with another
        baseline or unit gives other attributions."""
        return plain(  # deep enough for the tools' JSON schemas a template reads
            {
                "roles": self.roles,
                "text_unit": self.text_unit,
                "skip": self.skip,
                "text_baseline": self.baseline,
                "replace_id": self.replace_id,
                "audio_unit": self.audio_unit,
                "audio_baseline": self.audio_baseline,
                "audio_fill": None if self.audio_fill is None else "given",
                "transcripts": self.transcripts,
                "chat_template_kwargs": getattr(self.model, "chat_template_kwargs", None),
            },
            depth=16,
        )

    def segments(self) -> list[dict[str, Any]]:
        """The prompt as plain data for reports: per turn its role and parts; a
        text part as ``[text, feature index or -1]`` runs, an audio part as its
        clip index (in chat order).

        Examples::

            >>> inp.segments()[1]
            {'role': 'user', 'parts': [{'text': [['Who', 0], [' are', 1], ['?', -1]]}]}
        """
        enc = self.encoded
        owner = self.feature_of_position.tolist()
        turns, clip = [], 0
        for t, turn in enumerate(self.prompt):
            parts: list[dict[str, Any]] = []
            for p, part in enumerate(turn.parts):
                if isinstance(part, AudioPart):
                    parts.append({"audio": clip})
                    clip += 1
                    continue
                text = enc.part_texts.get((t, p), "")
                marks = [-1] * len(text)
                here = ((enc.turn == t) & (enc.part == p)).nonzero().flatten().tolist()
                for pos in here:
                    for c in range(int(enc.char_start[pos]), int(enc.char_end[pos])):
                        marks[c] = owner[pos]
                runs: list[list[Any]] = []
                for char, mark in zip(text, marks, strict=True):
                    if runs and runs[-1][1] == mark:
                        runs[-1][0] += char
                    else:
                        runs.append([char, mark])
                parts.append({"text": runs})
            parts += [{"text": [[call, -1]]} for call in _calls(turn.extra)]  # shown, no feature
            turns.append({"role": turn.role, "parts": parts})
        return turns

    # Feature construction -------------------------------------------------------------

    def _text_features(self) -> list[_Found]:
        enc = self.encoded
        chosen = [t for t, role in enumerate(enc.roles) if role in self.roles]
        found: list[_Found] = []
        for turn in chosen:
            in_turn = (enc.turn == turn).nonzero().flatten().tolist()
            content = [p for p in in_turn if enc.part[p] >= 0 and enc.modality[p] == "text"]
            if self.text_unit == "turn":  # the turn's own header, content and end tokens
                if in_turn:
                    found.append((tuple(in_turn), f"[{enc.roles[turn]} {turn}]", None))
                continue
            if self.text_unit == "token":
                groups = [([p], enc.tokens[p]) for p in content]
            else:
                groups = self._words(content, self.text_unit == "sentence")
            for members, text in groups:
                if not self._skipped(text):
                    label = strip_separators(text)
                    if self.text_unit == "token" and self._continues(members[0]):
                        label += OVERLAP  # as Captum marks a character's later tokens
                    found.append((tuple(members), label, None))
        return found

    def _continues(self, p: int) -> bool:
        """Whether token ``p`` holds part of a character the token before began."""
        enc = self.encoded
        return (
            p > 0
            and (enc.turn[p], enc.part[p]) == (enc.turn[p - 1], enc.part[p - 1])
            and 0 <= int(enc.char_start[p]) < int(enc.char_end[p - 1])
        )

    def _audio_features(self) -> list[_Found]:
        """Group each chosen clip's positions by ``audio_unit``."""
        enc = self.encoded
        if enc.clip is None or self.text_unit == "turn":
            return []  # whole turns already hold their audio
        assert enc.audio_time is not None
        found: list[_Found] = []
        clips = {  # clip -> its positions, for the clips in feature turns
            c: (enc.clip == c).nonzero().flatten().tolist()
            for c in sorted(set(enc.clip.tolist()) - {-1})
        }
        chosen = {c: p for c, p in clips.items() if enc.roles[int(enc.turn[p[0]])] in self.roles}
        per_clip = per_clip_spans(self.audio_unit)
        if is_span_list(self.audio_unit) and per_clip is None and len(chosen) > 1:
            raise InvalidSpanError(  # one clip's times were read in every clip
                f"audio_unit spans are times in one clip, and {len(chosen)} clips hold features; "
                "give one list of spans per clip, in chat order ([[...], [...]])"
            )
        for c, positions in chosen.items():
            times = enc.audio_time[positions].double().round(decimals=4).tolist()
            end = float(times[-1][1])
            if _aligned(self.audio_unit) or is_span_list(self.audio_unit):
                unit: Any = self.audio_unit
                if _aligned(self.audio_unit):
                    unit = self._word_spans(c, sentences=self.audio_unit == "sentence")
                elif per_clip is not None:
                    unit = per_clip[c]
                if unit:  # a clip's empty list: none of its audio is a feature
                    found += span_features(unit, positions, times, end)  # type: ignore[arg-type]
                continue
            groups: dict[int, list[int]] = {}
            spans: dict[int, tuple[float, float]] = {}
            for p, (t0, t1) in zip(positions, times, strict=True):
                key = audio_group(self.audio_unit, t0, t1, p, end)
                groups.setdefault(key, []).append(p)
                spans[key] = (spans[key][0], t1) if key in spans else (t0, t1)
            for key in sorted(groups):
                start, stop = spans[key]
                found.append((tuple(groups[key]), f"audio[{start:.2f}-{stop:.2f}s]", (start, stop)))
        return found

    def _words(self, content: list[int], sentences: bool = False) -> list[tuple[list[int], str]]:
        """Group content tokens into the words (or ``sentences``) they spell, in
        whole tokens.

        A token belongs to the word its first non-space character falls in;
        a token that reaches into the next words (Chinese characters a token
        joins, a word and its punctuation in one token) joins those words
        into one feature, labelled with all of them: a feature never drops
        part of a token, nor a token part of a word. A whitespace-only token
        joins the word after it, so that dropping a word drops its leading
        space too (as a template value ``" word"`` would).
        """
        enc = self.encoded
        spans_of = sentence_spans if sentences else word_spans
        words: dict[tuple[int, int], list[tuple[int, int]]] = {}  # of the parts content holds
        starts: dict[tuple[int, int], list[int]] = {}
        groups: list[tuple[tuple[int, int], int, int, list[int]]] = []  # part, spans, tokens
        pending: list[int] = []
        part = None
        for p in content:
            key_part = (int(enc.turn[p]), int(enc.part[p]))
            if key_part != part:  # leading space never crosses into another part
                part, pending = key_part, []
                if key_part not in words:  # (every part's, each call: 2.8 s for 100 turns)
                    words[key_part] = spans_of(enc.part_texts[key_part])
                    starts[key_part] = [a for a, _ in words[key_part]]
            text, spans = enc.part_texts[key_part], words[key_part]
            start, end = int(enc.char_start[p]), int(enc.char_end[p])
            while start < end and is_separator(text[start]):
                start += 1
            while end > start and is_separator(text[end - 1]):
                end -= 1
            if start == end:
                pending.append(p)
                continue
            first = bisect.bisect_right(starts[key_part], start) - 1
            if first < 0 or spans[first][1] <= start:  # not in a word: no feature's
                pending = []
                continue
            last = bisect.bisect_left(starts[key_part], end) - 1  # the last word it reaches
            if groups and groups[-1][0] == key_part and first <= groups[-1][2]:
                _, begin, reach, tokens = groups[-1]  # the token goes on the word before
                groups[-1] = (key_part, begin, max(reach, last), [*tokens, *pending, p])
            else:
                groups.append((key_part, first, last, [*pending, p]))
            pending = []
        return [
            (tokens, enc.part_texts[k][words[k][begin][0] : words[k][reach][1]])
            for k, begin, reach, tokens in groups
        ]

    def _word_spans(self, clip: int, sentences: bool = False) -> list[tuple[float, float, str]]:
        """Aligned word spans of one clip, labelled ``♪word`` (or ``sentences``:
        the words of each of the transcript's sentences in one span)."""
        if self.aligner is None or self.transcripts is None:
            raise AlignmentError(
                f"audio_unit={self.audio_unit!r} needs aligner=ForcedAligner(...) and "
                "transcripts= (one per clip)"
            )
        parts = [p for turn in self.prompt for p in turn.parts if isinstance(p, AudioPart)]
        part = parts[clip]
        transcript = self.transcripts[clip]
        spans = self.aligner.align(part.waveform, part.sample_rate, transcript)
        # The aligner's words are the transcript's spoken_word_spans: each one's sentence
        starts = [a for a, _ in sentence_spans(transcript)]
        chars = spoken_word_spans(transcript)
        grouped: dict[int, list[tuple[float, float, int, int]]] = {}
        for (a, b), (start, end, _) in zip(chars, spans, strict=True):
            grouped.setdefault(bisect.bisect_right(starts, a), []).append((start, end, a, b))
        self._spoken_sentences[clip] = [g[0][0] for g in grouped.values()]  # the Owen tree's
        if sentences:
            return [
                (g[0][0], g[-1][1], "♪" + transcript[g[0][2] : g[-1][3]]) for g in grouped.values()
            ]
        return [(start, end, f"♪{word}") for start, end, word in spans]

    def _check_transcripts(self) -> None:
        n_clips = sum(isinstance(p, AudioPart) for turn in self.prompt for p in turn.parts)
        per_clip = per_clip_spans(self.audio_unit)
        if per_clip is not None and len(per_clip) != n_clips:
            raise InvalidSpanError(
                f"{len(per_clip)} lists of spans for {n_clips} audio clips; give exactly "
                "one list per clip, in chat order"
            )
        if self.transcripts is None:
            return
        if not _aligned(self.audio_unit):
            raise AlignmentError('transcripts= is only read with audio_unit="word" or "sentence"')
        if len(self.transcripts) != n_clips:
            raise AlignmentError(
                f"{len(self.transcripts)} transcripts for {n_clips} audio clips; give exactly "
                "one transcript per clip, in chat order"
            )

    def _check_skip(self) -> None:
        """A misspelt kind (``"Punctuation"``) is read as a literal word and skips
        nothing: say so when the chat does not hold it."""
        said = " ".join(turn.text for turn in self.chat).lower()
        for entry in self.skip:
            if not isinstance(entry, str):
                raise InvalidOptionError(f"skip entries must be strings, got {entry!r}")
            near = difflib.get_close_matches(entry.lower(), SKIP_KINDS, n=1, cutoff=0.75)
            if entry not in SKIP_KINDS and near and entry.lower() not in said:
                warn_caller(
                    f"skip entry {entry!r} is read as a literal word, which this chat does not "
                    f"hold; did you mean {near[0]!r}?"
                )

    def _skipped(self, text: str) -> bool:
        visible = "".join(c for c in text if not is_separator(c))
        if not visible:  # space, zero-width and format characters are never features
            return True
        if "punctuation" in self.skip and all(is_punctuation(c) for c in visible):
            return True
        return visible in self.skip or text.strip() in self.skip or text in self.skip

    def _info(
        self, positions: tuple[int, ...], label: str, time: tuple[float, float] | None
    ) -> FeatureInfo:
        enc = self.encoded
        modalities = {enc.modality[p] for p in positions}
        turns = {int(enc.turn[p]) for p in positions} - {-1}
        roles = {enc.roles[t] for t in turns}
        clips = {int(enc.clip[p]) for p in positions} - {-1} if enc.clip is not None else set()
        return FeatureInfo(
            label=label,
            modality=modalities.pop() if len(modalities) == 1 else "mixed",
            turn=turns.pop() if len(turns) == 1 else -1,
            role=roles.pop() if len(roles) == 1 else "mixed" if roles else "",
            positions=positions,
            clip=clips.pop() if len(clips) == 1 else -1,
            time=time,
        )

    def _baseline(self, text_baseline: str | int, allow_special: bool) -> tuple[str, int | None]:
        if text_baseline == "drop":
            return "drop", None
        tok = self.model.tokenizer
        special = set(getattr(tok, "all_special_ids", ()))
        if text_baseline == "replace":
            # A neutral token: one space, else unk; never a control token such as
            # a pad that doubles as end-of-turn (SmolLM2's pad is <|im_end|>).
            space = tok.encode(" ", add_special_tokens=False)
            unk = getattr(tok, "unk_token_id", None)
            for candidate in (space[0] if len(space) == 1 else None, unk):
                if isinstance(candidate, int) and candidate not in special:
                    return "replace", candidate
            raise InvalidBaselineError(
                "the tokenizer has no single-space or non-special unk token; pass "
                "text_baseline=<a token id or token string>"
            )
        if isinstance(text_baseline, bool) or not isinstance(text_baseline, int | str):
            raise InvalidBaselineError(
                f"text_baseline must be 'drop', 'replace', a token id or a token string, "
                f"got {text_baseline!r}"
            )
        if isinstance(text_baseline, int):
            token_id: int | None = text_baseline
            if not 0 <= text_baseline < len(tok):
                raise InvalidBaselineError(
                    f"baseline token id {text_baseline} is outside the vocabulary "
                    f"(0..{len(tok) - 1})"
                )
        else:
            token_id = tok.convert_tokens_to_ids(text_baseline)
            if token_id is None or token_id == getattr(tok, "unk_token_id", object()):
                raise InvalidBaselineError(
                    f"baseline token {text_baseline!r} is not in the vocabulary"
                    + _spelt_as(tok, text_baseline)
                )
        if token_id in special and not allow_special:
            raise InvalidBaselineError(
                f"baseline token {text_baseline!r} is a special token, which the chat template "
                "gives a meaning of its own; pass allow_special_baseline=True to use it anyway"
            )
        return "replace", int(token_id)  # type: ignore[arg-type]


def _spelt_as(tok: Any, text: str) -> str:
    """How the tokenizer spells ``text`` as one token, if it does (a byte-level
    vocabulary holds ``"the"`` after a space as ``"Ġthe"``), for an error."""
    for spelling in (text, " " + text):
        ids = tok.encode(spelling, add_special_tokens=False)
        if len(ids) == 1:
            return (
                f" as a token string; the tokenizer spells {spelling!r} as the token "
                f"{tok.convert_ids_to_tokens(ids[0])!r} (id {ids[0]}): pass either"
            )
    return (
        " as a token string, and the tokenizer spells it in several tokens: pass one token "
        "(its string or id), or 'replace' for a neutral one"
    )


def _merge_groups(found: list[_Found], groups: Sequence[Hashable]) -> list[_Found]:
    """Merge features sharing a group id (Captum's ``mask``); merged ones lose
    their single time span."""
    if len(groups) != len(found):
        raise InvalidGroupsError(
            f"groups has {len(groups)} ids but there are {len(found)} features "
            f"({[label for _, label, _ in found]}); give one group id per feature"
        )
    for g in groups:
        try:
            hash(g)
        except TypeError:
            raise InvalidGroupsError(
                f"group ids must be hashable (int or str), got {g!r}; e.g. groups=[0, 0, 1]"
            ) from None
    merged: dict[Hashable, list[_Found]] = {}
    for g, feature in zip(groups, found, strict=True):
        merged.setdefault(g, []).append(feature)
    out: list[_Found] = []
    for members in merged.values():
        positions = tuple(sorted(p for m in members for p in m[0]))
        label = " ".join(m[1] for m in members)
        out.append((positions, label, members[0][2] if len(members) == 1 else None))
    return out


def _calls(extra: Mapping[str, Any]) -> list[str]:
    """An assistant turn's tool calls as ``name(arguments)``: OpenAI's and Hugging
    Face's ``{"function": {"name", "arguments"}}``, or the function alone."""
    out = []
    for call in extra.get("tool_calls") or ():
        fn = call.get("function", call)
        fn = fn if isinstance(fn, Mapping) else {"name": str(fn)}
        args = fn.get("arguments", "")
        args = args if isinstance(args, str) else json.dumps(args, default=str)
        out.append(f"{fn.get('name', 'tool')}({args})")
    return out


def _aligned(audio_unit: Any) -> bool:
    """Whether an audio unit is found by aligning a transcript (``"word"``, ``"sentence"``)."""
    return isinstance(audio_unit, str) and audio_unit in ALIGNED_UNITS
