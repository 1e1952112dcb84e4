"""The position table shared by inputs and adapters.

An adapter encodes a :class:`~captum_mllm.chat.Chat` into an :class:`EncodedChat`:
one row per model position, saying what sits there (a text token or an audio
frame), which turn and role it belongs to, and whether it is part of the turn's
content or of the chat template. :class:`~captum_mllm.inputs.ChatInput` reads the
table to decide features; adapters read it back to build perturbed batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

TEXT = "text"
AUDIO_IN = "audio_in"
AUDIO_OUT = "audio_out"


@dataclass
class EncodedChat:
    """One model position per row.

    Attributes:
        input_ids (Tensor): ``(L,)`` token ids; ``-1`` where the position is audio.
        modality (list of str): ``"text"``, ``"audio_in"`` or ``"audio_out"``.
        turn (Tensor): ``(L,)`` index of the chat turn the position belongs to,
            ``-1`` outside every turn (e.g. the generation prompt).
        part (Tensor): ``(L,)`` index of the part inside its turn, ``-1`` for
            template positions (role headers, separators, special tokens).
        char_start (Tensor): ``(L,)`` offset of the first character of the token
            inside its text part, ``-1`` elsewhere.
        char_end (Tensor): ``(L,)`` end offset inside the part, ``-1`` elsewhere.
        special (Tensor): ``(L,)`` bool, the position is a special/control token.
        tokens (list of str): readable text of each position.
        roles (list of str): role of each turn, by turn index.
        part_texts (dict): ``(turn, part) -> text`` of each text part.
        audio_time (Tensor): ``(L, 2)`` start and end second of audio positions
            inside their clip, ``-1`` elsewhere.
        clip (Tensor): ``(L,)`` index of the audio clip of audio positions
            (in chat order), ``-1`` elsewhere.
        state (dict): the adapter's own data, computed once per chat (e.g. the
            audio encoder's outputs); nothing outside the adapter reads it.
    """

    input_ids: Tensor
    modality: list[str]
    turn: Tensor
    part: Tensor
    char_start: Tensor
    char_end: Tensor
    special: Tensor
    tokens: list[str]
    roles: list[str]
    part_texts: dict[tuple[int, int], str] = field(default_factory=dict)
    audio_time: Tensor | None = None
    clip: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def content(self) -> Tensor:
        """``(L,)`` bool: the position holds a turn's own content."""
        return self.part >= 0


@dataclass
class MaskedChat:
    """A batch of coalitions applied to one encoded chat.

    Produced by :meth:`ChatInput.to_model_input`, consumed by adapters.

    Attributes:
        encoded (EncodedChat): the full chat.
        present (Tensor): ``(B, L)`` bool, the position's feature is present
            (fixed positions are always present).
        baseline (str): ``"drop"`` removes absent positions, ``"replace"`` puts
            ``replace_id`` in their place.
        replace_id (int, optional): token id used by ``"replace"``.
        prefix_len (int): leading positions no feature touches; adapters may
            compute them once and reuse their key/value cache.
        audio_baseline (str): absent audio positions are ``"drop"``-ped, get
            ``audio_fill`` as their ``"embedding"``, or their samples are zeroed
            and the clip re-encoded (``"silence"``).
        audio_fill (Tensor, optional): the ``"embedding"`` baseline vector;
            zeros when None.
    """

    encoded: EncodedChat
    present: Tensor
    baseline: str = "drop"
    replace_id: int | None = None
    prefix_len: int = 0
    audio_baseline: str = "drop"
    audio_fill: Tensor | None = None

    def __len__(self) -> int:
        return int(self.present.shape[0])

    def rows(self, start: int = 0) -> list[Tensor]:
        """Token ids of each coalition from position ``start`` on.

        Returns:
            list of Tensor: B id tensors; of different lengths under ``"drop"``.
        """
        ids = self.encoded.input_ids[start:]
        present = self.present[:, start:].to(ids.device)
        if self.baseline == "replace":
            assert self.replace_id is not None
            filled = torch.where(present, ids, torch.full_like(ids, self.replace_id))
            return list(filled)
        # One boolean index over the batch, then views of it (not one index a row).
        kept = ids.expand(len(present), -1)[present]
        return list(kept.split(present.sum(1).tolist()))


def coalition_key(present: Tensor) -> bytes:
    """A compact key of one coalition: its 0/1 row, bit-packed.

    Args:
        present (Tensor): ``(n,)`` presence of each feature (or position).

    Returns:
        bytes: the same for equal rows, different otherwise (for one ``n``).
    """
    return np.packbits(present.detach().cpu().numpy() != 0).tobytes()


def coalition_keys(rows: Tensor) -> list[bytes]:
    """:func:`coalition_key` of each row of ``(B, n)``, with one copy off the device."""
    packed = np.packbits(rows.detach().cpu().numpy() != 0, axis=1)
    return [row.tobytes() for row in packed]


class PositionTableBuilder:
    """Builds an :class:`EncodedChat` row by row, in position order (adapters use it).

    Examples::

        >>> table = PositionTableBuilder()
        >>> table.add_token(6, turn=0, part=-1)                  # a template token
        >>> table.add_audio(13, turn=0, part=0, clip=0, duration=1.0, frame_seconds=0.08)
        >>> encoded = table.build(["user"], tokenizer)
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.modality: list[str] = []
        self.turn: list[int] = []
        self.part: list[int] = []
        self.span: list[tuple[int, int]] = []
        self.time: list[tuple[float, float]] = []
        self.clip: list[int] = []
        self.labels: list[str | None] = []
        self.part_texts: dict[tuple[int, int], str] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add_token(
        self,
        token_id: int,
        turn: int,
        part: int,
        span: tuple[int, int] = (-1, -1),
        label: str | None = None,
    ) -> None:
        """One text position: ``span`` is its character range inside its part."""
        self._row(token_id, TEXT, turn, part, span if part >= 0 else (-1, -1), (-1.0, -1.0), -1)
        self.labels[-1] = label

    def add_text(self, encoding: Any, turn: int, part: int, text: str | None = None) -> None:
        """The tokens of one tokenizer call (with offsets when ``part >= 0``)."""
        ids = list(encoding["input_ids"])
        offsets = encoding.get("offset_mapping") or [(-1, -1)] * len(ids)
        if text is not None:
            self.part_texts[(turn, part)] = text
        for i, span in zip(ids, offsets, strict=True):
            self.add_token(i, turn, part, tuple(span))

    def add_audio(
        self, n: int, turn: int, part: int, clip: int, duration: float, frame_seconds: float
    ) -> None:
        """``n`` audio positions of ``frame_seconds`` each (the last ends with the clip)."""
        for k in range(n):
            end = min((k + 1) * frame_seconds, duration)
            self._row(-1, AUDIO_IN, turn, part, (-1, -1), (k * frame_seconds, end), clip)

    def _row(
        self,
        token_id: int,
        modality: str,
        turn: int,
        part: int,
        span: tuple[int, int],
        time: tuple[float, float],
        clip: int,
    ) -> None:
        self.ids.append(token_id)
        self.modality.append(modality)
        self.turn.append(turn)
        self.part.append(part)
        self.span.append(span)
        self.time.append(time)
        self.clip.append(clip)
        self.labels.append(None)

    def build(self, roles: list[str], tokenizer: Any) -> EncodedChat:
        """The table; token labels default to the tokenizer's decoding."""
        special = set(tokenizer.all_special_ids)
        tokens = [
            label
            if label is not None
            else tokenizer.decode([i])
            if i >= 0
            else f"audio[{t0:.2f}-{t1:.2f}s]"
            for i, (t0, t1), label in zip(self.ids, self.time, self.labels, strict=True)
        ]
        spans = torch.tensor(self.span, dtype=torch.long).reshape(-1, 2)
        return EncodedChat(
            input_ids=torch.tensor(self.ids, dtype=torch.long),
            modality=self.modality,
            turn=torch.tensor(self.turn, dtype=torch.long),
            part=torch.tensor(self.part, dtype=torch.long),
            char_start=spans[:, 0],
            char_end=spans[:, 1],
            special=torch.tensor([i in special for i in self.ids], dtype=torch.bool),
            tokens=tokens,
            roles=roles,
            part_texts=self.part_texts,
            audio_time=torch.tensor(self.time, dtype=torch.float).reshape(-1, 2),
            clip=torch.tensor(self.clip, dtype=torch.long),
        )
