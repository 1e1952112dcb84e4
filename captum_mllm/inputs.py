"""Captum interpretable inputs over chats.

:class:`ChatInput` reads an adapter's position table and decides which
positions form which interpretable feature. Captum perturbs ``ones(1, n)``;
``to_model_input`` turns a batch of coalitions into a :class:`MaskedChat`.
"""

from __future__ import annotations

import bisect
import collections
import json
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from captum_mllm.audio_units import audio_group, is_span_list
from captum_mllm.chat import ROLES, AudioPart, Chat, as_chat
from captum_mllm.chat_features import ChatFeatures, aligned, merge_groups, text_baseline_token
from captum_mllm.chat_features import FeatureInfo as FeatureInfo  # still importable from here
from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import (
    AlignmentError,
    InvalidBaselineError,
    InvalidModelError,
    InvalidOptionError,
    InvalidRoleError,
    NoFeaturesError,
)
from captum_mllm.fingerprint import plain
from captum_mllm.models.base import ModelAdapter
from captum_mllm.words import TEXT_UNITS, is_separator, paragraph_spans, sentence_spans

AUDIO_BASELINES = ("drop", "embedding", "silence")
#: Feature labels a ChatInput's repr shows.
REPR_LABELS = 8


class ChatInput(ChatFeatures):
    """A chat whose parts (tokens, words or whole turns) are Captum features.

    Args:
        chat (Chat or list of dict): the chat, or a Hugging Face message list.
        model (ModelAdapter): the adapter that will run it; encodes the chat.
        roles (tuple of str, optional): roles whose turns hold features.
            Default: ``("user",)``
        text_unit (str, optional): ``"token"``, ``"word"``, ``"sentence"`` (see
            :func:`~captum_mllm.words.sentence_spans`), ``"paragraph"`` (text up
            to a blank line, such as one retrieved passage of several: see
            :func:`~captum_mllm.words.paragraph_spans`) or ``"turn"``.
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
        if not aligned(audio_unit) and not is_span_list(audio_unit):  # checked without audio
            audio_group(audio_unit, 0.0, 0.0, 0, 1.0)
        if aligner is not None and not aligned(audio_unit):
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
            found = merge_groups(found, groups)
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
        self.baseline, self.replace_id = text_baseline_token(
            model.tokenizer, text_baseline, allow_special_baseline
        )
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
        """Features grouped turn -> part -> paragraph -> sentence (of a text
        part, see :func:`~captum_mllm.words.paragraph_spans` and
        :func:`~captum_mllm.words.sentence_spans`, or of a clip's aligned
        transcript) -> feature, as nested lists of feature indices (levels with
        one member collapse): the tree of :class:`~captum_mllm.methods.HierarchicalShapley`.

        Examples::

            >>> inp.feature_tree()   # system words, then the user's clip and two sentences
            [[0, 1], [[2, 3, 4], [[5, 6], [7, 8]]]]
        """
        enc = self.encoded
        turns: dict[int, dict[Any, dict[tuple[int, int], list[int]]]] = {}
        across = []  # a group across turns (or parts) belongs to none: a node of its own
        starts = {k: [a for a, _ in sentence_spans(t)] for k, t in enc.part_texts.items()}
        paragraph_starts = {
            k: [a for a, _ in paragraph_spans(t)] for k, t in enc.part_texts.items()
        }
        for f, feature in enumerate(self.features):
            if feature.turn < 0:
                across.append(f)
                continue
            parts = {int(enc.part[p]) for p in feature.positions} - {-1}
            part = parts.pop() if len(parts) == 1 else ("across", f)
            paragraph = sentence = 0
            if feature.modality == "text" and isinstance(part, int):
                text = enc.part_texts[(feature.turn, part)]
                first = min(p for p in feature.positions if int(enc.part[p]) == part)
                start = int(enc.char_start[first])  # its first visible character's place
                while start < len(text) - 1 and is_separator(text[start]):
                    start += 1
                sentence = bisect.bisect_right(starts[(feature.turn, part)], start)
                paragraph = bisect.bisect_right(paragraph_starts[(feature.turn, part)], start)
            elif feature.clip in self._spoken_sentences and feature.time is not None:
                middle = (feature.time[0] + feature.time[1]) / 2  # a spoken word's sentence
                sentence = bisect.bisect_right(self._spoken_sentences[feature.clip], middle)
            sentences = turns.setdefault(feature.turn, {}).setdefault(part, {})
            sentences.setdefault((paragraph, sentence), []).append(f)

        def collapse(node: list[Any]) -> Any:
            """A list of one member is that member."""
            node = [collapse(n) if isinstance(n, list) else n for n in node]
            return node[0] if len(node) == 1 else node

        def paragraphs(sentences: dict[tuple[int, int], list[int]]) -> list[list[list[int]]]:
            grouped: dict[int, list[list[int]]] = {}
            for (paragraph, _), members in sentences.items():
                grouped.setdefault(paragraph, []).append(members)
            return list(grouped.values())

        tree = [
            collapse([paragraphs(sentences) for sentences in parts.values()])
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
        return self if same and "answer_lead" not in other.encoded.state else other

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
