"""A speech model with a known right answer, trained and shipped by the project.

LFM2-Audio's architecture at a few million parameters, trained by
``python -m captum_mllm.demo.train`` to answer a spoken smart-home request
("please turn on the kitchen light") in text ("kitchen light on"): the spoken
room, device and action decide the answer's three tokens, nothing else does.
A small CTC aligner trained on the same speech gives word spans offline. See
``MODEL_CARD.md`` beside this file.

Examples::

    >>> from captum_mllm import demo
    >>> model, aligner = demo.load()
    >>> example = demo.examples()[0]
    >>> inp = demo.request_input(model, aligner, example.waveform, example.transcript)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from captum_mllm.audio import ForcedAligner
from captum_mllm.chat import Chat
from captum_mllm.demo.task import SAMPLE_RATE, SYSTEM_PROMPT
from captum_mllm.errors import ModelNotInstalledError
from captum_mllm.inputs import ChatInput
from captum_mllm.models.lfm2_audio import LFM2AudioAdapter

WEIGHTS = Path(__file__).parent / "weights"

__all__ = [
    "WEIGHTS",
    "Example",
    "examples",
    "load",
    "request_chat",
    "request_input",
    "top_words",
]


@dataclass(frozen=True)
class Example:
    """A bundled spoken request.

    Attributes:
        waveform (Tensor): 16 kHz mono samples.
        transcript (str): what it says.
        answer (str): the right answer ("kitchen light on").
        deciding (tuple of str): the spoken word deciding each answer token.
        spans (list): each word's true ``(start_s, end_s, word)`` (words were
            spoken alone and joined, so their spans are known); empty for a
            request spoken as one sentence.
        file (Path): the WAV file.
    """

    waveform: torch.Tensor
    transcript: str
    answer: str
    deciding: tuple[str, ...]
    spans: list[tuple[float, float, str]]
    file: Path


def load(device: str | torch.device | None = "cpu") -> tuple[LFM2AudioAdapter, ForcedAligner]:
    """The demo model (as an adapter) and its word aligner, from the package.

    Args:
        device (str or torch.device, optional): Default: ``"cpu"``

    Returns:
        tuple: ``(LFM2AudioAdapter, ForcedAligner)``, both in eval mode, float32.

    Raises:
        ModelNotInstalledError: the weights are missing from this installation.
    """
    if not (WEIGHTS / "model" / "model.safetensors").is_file():
        raise ModelNotInstalledError(
            f"the demo weights are missing from {WEIGHTS}; reinstall captum-mllm or run "
            "python -m captum_mllm.demo.train"
        )
    model = LFM2AudioAdapter.from_pretrained(
        str(WEIGHTS / "model"), device=device, dtype=torch.float32
    )
    return model, ForcedAligner(str(WEIGHTS / "aligner"), device=device)


def examples(sentences: bool = False) -> list[Example]:
    """The bundled spoken requests (held out from training).

    Args:
        sentences (bool, optional): the 8 requests spoken as whole sentences
            (word spans unknown: :func:`request_input` aligns them) instead of
            the 12 spoken a word at a time. Default: False
    """
    index = "sentences.json" if sentences else "examples.json"
    rows = json.loads((WEIGHTS / "clips" / index).read_text(encoding="utf-8"))
    out = []
    for row in rows:
        file = WEIGHTS / "clips" / row["file"]
        data, rate = sf.read(file, dtype="float32")
        assert rate == SAMPLE_RATE
        out.append(
            Example(
                waveform=torch.from_numpy(data),
                transcript=row["transcript"],
                answer=row["answer"],
                deciding=tuple(row["deciding"]),
                spans=[(float(s), float(e), str(w)) for s, e, w in row["spans"]],
                file=file,
            )
        )
    return out


def request_chat(waveform: torch.Tensor) -> Chat:
    """The demo's chat: its system prompt and a spoken user turn."""
    return Chat().system(SYSTEM_PROMPT).user(audio=waveform, sample_rate=SAMPLE_RATE)


def request_input(
    model: LFM2AudioAdapter,
    aligner: ForcedAligner,
    waveform: torch.Tensor,
    transcript: str,
    **kwargs: Any,
) -> ChatInput:
    """A ``ChatInput`` with one feature per spoken word of a request.

    Absent words are silenced (their samples zeroed, the clip re-encoded): the
    conformer encoder attends over the whole clip, so every audio position
    carries some of every word, and dropping a word's positions (``"drop"``)
    or replacing them (``"embedding"``) leaves what it said in the others.

    Args:
        model, aligner: from :func:`load`.
        waveform (Tensor): the spoken request, 16 kHz mono.
        transcript (str): what it says (the aligner places its words).
        **kwargs: more ``ChatInput`` arguments (e.g. ``audio_baseline``).
    """
    options: dict[str, Any] = {
        "audio_unit": "word",
        "roles": ("user",),
        "audio_baseline": "silence",
    }
    options.update(kwargs)
    return ChatInput(
        request_chat(waveform),
        model,
        aligner=aligner,
        transcripts=transcript,
        **options,
    )


def top_words(res: Any) -> list[list[str]]:
    """For each output token, the spoken words of the feature with the largest
    attribution (short words may share a feature)."""
    words = [label.replace("♪", " ").split() for label in res.input_tokens]
    return [words[int(row.argmax())] for row in torch.as_tensor(res.token_attr)]
