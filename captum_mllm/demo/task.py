"""The demo's spoken-request task: which words decide the answer, and its speech.

A request such as "please turn on the kitchen light" is answered in text
"kitchen light on": the spoken room decides the answer's first token, the
device its second, the action its third. The other spoken words decide
nothing. Speech is synthesised offline with Debian's ``espeak-ng`` (only the
training script and the benchmark need it; tests read committed clips).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from captum_mllm.errors import SynthesisError

ROOMS = ("kitchen", "bedroom", "garage", "office", "bathroom", "hallway")
DEVICES = ("light", "fan", "heater", "radio")
ACTIONS = ("on", "off")
#: The answer word for a deciding word that was not heard (silenced in training).
UNKNOWN = "unknown"
TEMPLATES = (
    "please turn {action} the {room} {device}",
    "turn the {room} {device} {action}",
    "switch {action} the {room} {device} please",
    "could you turn the {room} {device} {action}",
)
SYSTEM_PROMPT = "You control the lights and appliances of a house."
VOICES = (
    "en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "en-us+f2", "en-us+m3", "en-gb+f3", "en-us+f4", "en-gb+m5",
)  # fmt: skip
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Request:
    """One spoken request and its answer.

    Attributes:
        room, device, action (str): the deciding words.
        template (int): which phrasing of :data:`TEMPLATES`.
    """

    room: str
    device: str
    action: str
    template: int = 0

    @property
    def transcript(self) -> str:
        return TEMPLATES[self.template].format(
            room=self.room, device=self.device, action=self.action
        )

    @property
    def answer(self) -> str:
        return f"{self.room} {self.device} {self.action}"

    @property
    def deciding(self) -> tuple[str, str, str]:
        """The spoken word deciding each answer word, in answer order."""
        return (self.room, self.device, self.action)


@dataclass
class Utterance:
    """A synthesised request: 16 kHz mono samples and each word's time span."""

    request: Request
    waveform: torch.Tensor
    spans: list[tuple[float, float, str]] = field(default_factory=list)  # known only if joined
    answer: str | None = None  # the trained answer when it is not the request's own
    given: str | None = None  # the answer fed back while training, if not ``expected``

    @property
    def expected(self) -> str:
        """The answer the model is trained to give for this clip."""
        return self.answer if self.answer is not None else self.request.answer

    @property
    def fed_back(self) -> str:
        """The answer whose earlier words the model reads while it is trained on
        each next one (teacher forcing): ``expected`` unless ``given``."""
        return self.given if self.given is not None else self.expected


def all_requests() -> list[Request]:
    return [
        Request(r, d, a, t)
        for r in ROOMS
        for d in DEVICES
        for a in ACTIONS
        for t in range(len(TEMPLATES))
    ]


def espeak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> torch.Tensor:
    """Speak ``text`` with espeak-ng: 16 kHz mono float32 samples."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisError("espeak-ng is not installed: apt-get install espeak-ng")
    cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    out = subprocess.run(cmd, capture_output=True, check=False)
    if out.returncode != 0 or not out.stdout:
        raise SynthesisError(f"espeak-ng failed on {text!r}: {out.stderr.decode()[:200]}")
    data, rate = sf.read(io.BytesIO(out.stdout), dtype="float32")
    wave = torch.from_numpy(np.ascontiguousarray(data))
    return AF.resample(wave, rate, SAMPLE_RATE)


def trim(wave: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Cut leading and trailing silence (10 ms frames under ``threshold`` peak)."""
    frames = wave[: len(wave) // 160 * 160].reshape(-1, 160).abs().amax(1)
    loud = torch.nonzero(frames > threshold)
    if len(loud) == 0:
        return wave
    return wave[int(loud[0]) * 160 : (int(loud[-1]) + 1) * 160]


def synthesise(request: Request, rng: np.random.Generator, joined: bool | None = None) -> Utterance:
    """One spoken version of ``request`` with a random voice, speed, pitch,
    silence padding and noise.

    Args:
        request (Request): what is said.
        rng (numpy Generator): the random choices.
        joined (bool, optional): speak each word alone and join them with short
            pauses, so every word's span is known exactly (else one sentence,
            spans unknown). Default: chosen at random.
    """
    voice = VOICES[rng.integers(len(VOICES))]
    speed, pitch = int(rng.integers(130, 200)), int(rng.integers(25, 75))
    joined = bool(rng.random() < 0.5) if joined is None else joined
    lead, tail = rng.uniform(0.05, 0.4, size=2)
    pieces = [torch.zeros(int(lead * SAMPLE_RATE))]
    spans: list[tuple[float, float, str]] = []
    if joined:
        t = lead
        for i, word in enumerate(request.transcript.split()):
            if i:
                gap = torch.zeros(int(rng.uniform(0.02, 0.15) * SAMPLE_RATE))
                pieces.append(gap)
                t += len(gap) / SAMPLE_RATE
            w = trim(espeak(word, voice, speed, pitch))
            pieces.append(w)
            spans.append((t, t + len(w) / SAMPLE_RATE, word))
            t += len(w) / SAMPLE_RATE
    else:
        pieces.append(trim(espeak(request.transcript, voice, speed, pitch)))
    pieces.append(torch.zeros(int(tail * SAMPLE_RATE)))
    wave = torch.cat(pieces)
    wave = wave * float(rng.uniform(0.3, 1.0)) / max(float(wave.abs().max()), 1e-6)
    noise = torch.from_numpy(rng.normal(size=len(wave)).astype(np.float32))
    wave = wave + float(rng.uniform(0.0, 0.02)) * noise
    return Utterance(request, wave.float(), spans)
