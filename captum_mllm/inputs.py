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

from captum_mllm.chat import ROLES, Chat, as_chat
from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import CaptumMLLMError, InvalidGroupsError, NoFeaturesError

TEXT_UNITS = ("token", "word", "turn")
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
    """

    label: str
    modality: str
    turn: int
    role: str
    positions: tuple[int, ...]


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
    ) -> None:
        self.chat = as_chat(chat)
        self.model = model
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise CaptumMLLMError(f"unknown roles {unknown}; use some of {ROLES}")
        if text_unit not in TEXT_UNITS:
            raise CaptumMLLMError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
        self.roles = tuple(roles)
        self.text_unit = text_unit
        self.skip = tuple(skip)
        self.encoded: EncodedChat = model.encode(self.chat)

        feature_positions, labels = self._text_features()
        if groups is not None:
            feature_positions, labels = _merge_groups(feature_positions, labels, groups)
        if not feature_positions:
            raise NoFeaturesError(
                f"no features left in turns with roles {self.roles} after skipping {self.skip}; "
                "widen roles=, or change text_unit= / skip="
            )

        n_pos = len(self.encoded)
        self.feature_of_position = torch.full((n_pos,), -1, dtype=torch.long)
        for f, positions in enumerate(feature_positions):
            self.feature_of_position[list(positions)] = f
        self.features = [
            self._info(label, positions)
            for label, positions in zip(labels, feature_positions, strict=True)
        ]
        self.values: list[str] = list(labels)
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
        return MaskedChat(self.encoded, present, self.baseline, self.replace_id, self.prefix_len)

    def format_attr(self, itp_attr: Tensor) -> Tensor:
        return itp_attr

    # Feature construction -------------------------------------------------------------

    def _text_features(self) -> tuple[list[tuple[int, ...]], list[str]]:
        enc = self.encoded
        chosen = [t for t, role in enumerate(enc.roles) if role in self.roles]
        positions: list[tuple[int, ...]] = []
        labels: list[str] = []
        for turn in chosen:
            in_turn = (enc.turn == turn).nonzero().flatten().tolist()
            content = [p for p in in_turn if enc.part[p] >= 0 and enc.modality[p] == "text"]
            if self.text_unit == "turn":
                bos = getattr(self.model.tokenizer, "bos_token_id", None)
                whole = tuple(p for p in in_turn if not (p == 0 and enc.input_ids[p] == bos))
                if whole:
                    positions.append(whole)
                    labels.append(f"[{enc.roles[turn]} {turn}]")
                continue
            if self.text_unit == "token":
                groups = [([p], enc.tokens[p]) for p in content]
            else:
                groups = self._words(content)
            for members, text in groups:
                if self._skipped(text):
                    continue
                positions.append(tuple(members))
                labels.append(text.strip())
        return positions, labels

    def _words(self, content: list[int]) -> list[tuple[list[int], str]]:
        """Group content tokens by the word their first non-space character falls in.

        A whitespace-only token joins the word after it, so that dropping a word
        drops its leading space too (as a template value ``" word"`` would).
        """
        enc = self.encoded
        groups: dict[tuple[int, int, int], list[int]] = {}
        texts: dict[tuple[int, int, int], str] = {}
        pending: list[int] = []
        for p in content:
            key_part = (int(enc.turn[p]), int(enc.part[p]))
            text = enc.part_texts[key_part]
            start, end = int(enc.char_start[p]), int(enc.char_end[p])
            while start < end and text[start].isspace():
                start += 1
            if start == end:
                pending.append(p)
                continue
            for m in _WORD.finditer(text):
                if m.start() <= start < m.end():
                    key = (*key_part, m.start())
                    groups.setdefault(key, []).extend([*pending, p])
                    texts[key] = m.group()
                    break
            pending = []
        return [(groups[k], texts[k]) for k in sorted(groups)]

    def _skipped(self, text: str) -> bool:
        stripped = text.strip()
        if not stripped:
            return True
        if "punctuation" in self.skip and all(
            unicodedata.category(c).startswith(("P", "S")) or c.isspace() for c in stripped
        ):
            return True
        return stripped in self.skip or text in self.skip

    def _info(self, label: str, positions: tuple[int, ...]) -> FeatureInfo:
        enc = self.encoded
        modalities = {enc.modality[p] for p in positions}
        turn = int(enc.turn[positions[0]])
        return FeatureInfo(
            label=label,
            modality=modalities.pop() if len(modalities) == 1 else "mixed",
            turn=turn,
            role=enc.roles[turn] if turn >= 0 else "",
            positions=positions,
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


def _merge_groups(
    positions: list[tuple[int, ...]], labels: list[str], groups: Sequence[Hashable]
) -> tuple[list[tuple[int, ...]], list[str]]:
    if len(groups) != len(positions):
        raise InvalidGroupsError(
            f"groups has {len(groups)} ids but there are {len(positions)} features "
            f"({labels}); give one group id per feature"
        )
    order: dict[Hashable, int] = {}
    merged_pos: list[list[int]] = []
    merged_lab: list[list[str]] = []
    for g, pos, lab in zip(groups, positions, labels, strict=True):
        if g not in order:
            order[g] = len(order)
            merged_pos.append([])
            merged_lab.append([])
        merged_pos[order[g]] += pos
        merged_lab[order[g]].append(lab)
    return [tuple(sorted(p)) for p in merged_pos], [" ".join(lab) for lab in merged_lab]
