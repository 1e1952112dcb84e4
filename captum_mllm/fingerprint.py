"""Fingerprints: digests naming one explanation, for the coalition store.

Two runs share stored values only when every part matches: the model
(class, configuration and weights), the chat (text and audio samples), the
features (positions and baselines), the target (its settings and the answer
explained) and the seed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from captum_mllm.chat import AudioPart, Chat


def digest(*parts: Any) -> str:
    """SHA-256 of plain data (JSON-able values, bytes and tensors), hex."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(str(part.dtype).encode() + str(tuple(part.shape)).encode())
            h.update(
                part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """The model's class, its configuration and every weight."""
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    config_text = to_json() if callable(to_json) else repr(config)
    state = model.state_dict()
    return digest(type(model).__qualname__, config_text, *state.keys(), *state.values())


def chat_digest(chat: Chat) -> str:
    """Every turn's role, text and audio samples."""
    parts: list[Any] = []
    for turn in chat:
        parts.append(turn.role)
        for part in turn.parts:
            if isinstance(part, AudioPart):
                parts += [part.sample_rate, part.waveform]
            else:
                parts.append(part.text)
    return digest(*parts)
