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
        return [ids[row] for row in present]


def coalition_key(present: Tensor) -> bytes:
    """A compact key of one coalition: its 0/1 row, bit-packed.

    Args:
        present (Tensor): ``(n,)`` presence of each feature (or position).

    Returns:
        bytes: the same for equal rows, different otherwise (for one ``n``).
    """
    return np.packbits(present.detach().cpu().numpy() != 0).tobytes()
