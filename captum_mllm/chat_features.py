"""A chat's features: which positions of its position table form each token,
word, sentence, paragraph, turn or audio span feature (:class:`ChatFeatures`, which
:class:`~captum_mllm.inputs.ChatInput` inherits), what each feature is
(:class:`FeatureInfo`), and the token that stands for an absent text feature."""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from captum.attr import InterpretableInput

from captum_mllm.audio_units import (
    ALIGNED_UNITS,
    audio_group,
    is_span_list,
    per_clip_spans,
    span_features,
)
from captum_mllm.chat import AudioPart, Chat
from captum_mllm.encoding import EncodedChat
from captum_mllm.errors import (
    AlignmentError,
    InvalidBaselineError,
    InvalidGroupsError,
    InvalidOptionError,
    InvalidSpanError,
    warn_caller,
)
from captum_mllm.models.base import OVERLAP
from captum_mllm.words import (
    is_punctuation,
    is_separator,
    paragraph_spans,
    sentence_spans,
    spoken_word_spans,
    strip_separators,
    word_spans,
)

SKIP_KINDS = ("punctuation", "special")  # skip= names; anything else is a literal string
# (positions, label, time span for audio features)
Found = tuple[tuple[int, ...], str, tuple[float, float] | None]


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


class ChatFeatures(InterpretableInput):
    """Feature finding over a chat input's position table (its settings are
    :class:`~captum_mllm.inputs.ChatInput`'s)."""

    chat: Chat
    prompt: Chat
    encoded: EncodedChat
    roles: tuple[str, ...]
    text_unit: str
    skip: tuple[str, ...]
    audio_unit: Any
    aligner: Any
    transcripts: Sequence[str] | None
    _spoken_sentences: dict[int, list[float]]

    def _text_features(self) -> list[Found]:
        enc = self.encoded
        chosen = [t for t, role in enumerate(enc.roles) if role in self.roles]
        found: list[Found] = []
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
                groups = self._words(content, self.text_unit)
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

    def _audio_features(self) -> list[Found]:
        """Group each chosen clip's positions by ``audio_unit``."""
        enc = self.encoded
        if enc.clip is None or self.text_unit == "turn":
            return []  # whole turns already hold their audio
        assert enc.audio_time is not None
        found: list[Found] = []
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
            if aligned(self.audio_unit) or is_span_list(self.audio_unit):
                unit: Any = self.audio_unit
                if aligned(self.audio_unit):
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

    def _words(self, content: list[int], unit: str = "word") -> list[tuple[list[int], str]]:
        """Group content tokens into the words (or sentences, or paragraphs:
        ``unit``) they spell, in whole tokens.

        A token belongs to the word its first non-space character falls in;
        a token that reaches into the next words (Chinese characters a token
        joins, a word and its punctuation in one token) joins those words
        into one feature, labelled with all of them: a feature never drops
        part of a token, nor a token part of a word. A whitespace-only token
        joins the word after it, so that dropping a word drops its leading
        space too (as a template value ``" word"`` would).
        """
        enc = self.encoded
        units = {"word": word_spans, "sentence": sentence_spans, "paragraph": paragraph_spans}
        spans_of = units[unit]
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
        if not aligned(self.audio_unit):
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


def text_baseline_token(
    tokenizer: Any, text_baseline: str | int, allow_special: bool
) -> tuple[str, int | None]:
    """``("drop", None)``, or ``("replace", id)``: the token that stands for an
    absent text feature (see :class:`~captum_mllm.inputs.ChatInput`'s ``text_baseline``)."""
    if text_baseline == "drop":
        return "drop", None
    tok = tokenizer
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
                f"baseline token id {text_baseline} is outside the vocabulary (0..{len(tok) - 1})"
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


def merge_groups(found: list[Found], groups: Sequence[Hashable]) -> list[Found]:
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
    merged: dict[Hashable, list[Found]] = {}
    for g, feature in zip(groups, found, strict=True):
        merged.setdefault(g, []).append(feature)
    out: list[Found] = []
    for members in merged.values():
        positions = tuple(sorted(p for m in members for p in m[0]))
        label = " ".join(m[1] for m in members)
        out.append((positions, label, members[0][2] if len(members) == 1 else None))
    return out


def aligned(audio_unit: Any) -> bool:
    """Whether an audio unit is found by aligning a transcript (``"word"``, ``"sentence"``)."""
    return isinstance(audio_unit, str) and audio_unit in ALIGNED_UNITS
