"""Audio I/O as pure functions: read with soundfile, resample with torchaudio.

Waveforms are mono float32 tensors of shape ``(n_samples,)`` with an explicit
sample rate.
"""

from __future__ import annotations

import io
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captum_mllm.errors import AlignmentError, AudioError, warn_caller
from captum_mllm.fingerprint import digest
from captum_mllm.words import is_punctuation, spoken_word_spans

#: A float waveform peaking above this warns: not samples in [-1, 1] (a file's
#: float data or a clipped mix may overshoot 1 a little).
LOUDEST_FLOAT = 2.0
_INT_SCALE = {torch.int8: 128.0, torch.int16: 32768.0, torch.int32: 2147483648.0}


def _load_audio_value(audio: Mapping[str, Any], sample_rate: int | None) -> tuple[Tensor, int, str]:
    """A Hugging Face ``datasets`` Audio value: ``{"array", "sampling_rate"}``
    decoded, or ``{"bytes"}`` / ``{"path"}`` undecoded."""
    if audio.get("array") is not None:
        rate = audio.get("sampling_rate")
        if rate is not None and sample_rate is not None and rate != sample_rate:
            raise AudioError(
                f"the audio says sampling_rate={rate} and sample_rate={sample_rate} was given"
            )
        array = audio["array"]
        if isinstance(array, list | tuple):  # a datasets folder's nested column holds lists
            array = np.asarray(array, dtype=np.float32)
        waveform, rate, _ = load_audio(array, rate if rate is not None else sample_rate)
        return waveform, rate, "<array>"  # its "path" names the dataset's file, maybe not here
    if audio.get("bytes") is not None:
        return load_audio(audio["bytes"])
    if audio.get("path") is not None:
        return load_audio(audio["path"])
    raise AudioError(
        "audio given as a mapping needs 'array' and 'sampling_rate' (a Hugging Face datasets "
        f"Audio value), 'bytes' or 'path'; got the keys {sorted(audio)}"
    )


def is_samples(audio: Any) -> bool:
    """Whether ``audio`` is one waveform as a list of numbers (JSON's, or a
    feature extractor's input in transformers), not a list of clips."""
    return (
        isinstance(audio, list | tuple)
        and len(audio) > 0
        and all(isinstance(x, numbers.Real) for x in audio)
    )


def load_audio(audio: Any, sample_rate: int | None = None) -> tuple[Tensor, int, str]:
    """Read audio from a path, bytes, a numpy array (or a list of numbers), a
    tensor or a Hugging Face ``datasets`` Audio value (``{"array",
    "sampling_rate"}``), as mono float.

    Arrays and tensors may be ``(n_samples,)``, ``(channels, n_samples)`` or
    soundfile's ``(n_samples, channels)``: the longer axis is time. Channels
    are averaged to mono. Integer PCM is scaled to [-1, 1] as soundfile and
    torchaudio do (int16 / 32768, int32 / 2^31, int8 / 128, uint8 centred
    on 128). URLs are not downloaded.

    Args:
        audio (str, PathLike, bytes, ndarray, Tensor or dict): the audio.
        sample_rate (int, optional): required for arrays and tensors; for
            files the header says it, and a different value raises.

    Returns:
        tuple: ``(waveform (n_samples,) float32, sample_rate, source label)``.

    Raises:
        AudioError: unreadable, empty, or holding NaN or infinite samples.

    Warns when float samples peak above :data:`LOUDEST_FLOAT` (integer PCM
    cast to float without scaling).

    Examples::

        >>> wave, sr, _ = load_audio("question.wav")
        >>> wave, sr, _ = load_audio(np.zeros((16000, 2), dtype=np.int16), 16000)  # stereo
    """
    if isinstance(audio, str) and audio.split("://")[0].lower() in ("http", "https", "ftp", "s3"):
        raise AudioError(
            f"{audio!r} is a URL; captum-mllm does not download audio: download the file "
            "and pass its path"
        )
    if isinstance(audio, Mapping):
        return _load_audio_value(audio, sample_rate)
    if is_samples(audio):
        audio = np.asarray(audio, dtype=np.float32)
    if isinstance(audio, str | os.PathLike | bytes | bytearray):
        import soundfile as sf

        source = os.fspath(audio) if not isinstance(audio, bytes | bytearray) else "<bytes>"
        handle = io.BytesIO(audio) if isinstance(audio, bytes | bytearray) else audio
        if handle is audio and not os.path.exists(source):  # soundfile says "System error"
            raise AudioError(f"no audio file at {os.path.abspath(source)}")
        try:
            data, header_rate = sf.read(handle, dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises several types for bad files
            raise AudioError(f"cannot read audio from {source!r}: {exc}") from exc
        if sample_rate is not None and sample_rate != header_rate:  # it went unread
            raise AudioError(
                f"{source!r} holds {header_rate} Hz audio, not sample_rate={sample_rate}; "
                "leave sample_rate= out for files (they are resampled for the model)"
            )
        sample_rate = header_rate
        waveform = torch.from_numpy(data.T.copy())  # (channels, n)
    elif isinstance(audio, np.ndarray | Tensor):
        if sample_rate is None:
            raise AudioError("audio given as an array needs its sample_rate=")
        source = "<array>"
        if isinstance(audio, np.ndarray) and not audio.flags.writeable:
            audio = audio.copy()  # Arrow's and pandas' read-only memory: torch warned of it
        waveform = _as_float(torch.as_tensor(audio))
        if waveform.dim() == 1:  # (n,) -> (1, n)
            waveform = waveform[None]
        elif waveform.dim() == 2 and waveform.shape[0] > waveform.shape[1]:
            waveform = waveform.T  # soundfile's (n, channels) -> (channels, n)
    else:
        raise AudioError(f"cannot read audio of type {type(audio).__name__}")
    if sample_rate is None or int(sample_rate) <= 0 or int(sample_rate) != sample_rate:
        raise AudioError(f"invalid sample rate {sample_rate!r}: give a positive whole number")
    if waveform.dim() != 2 or 0 in waveform.shape:
        raise AudioError(
            f"audio from {source!r} is empty or not (n,), (channels, n) or (n, channels)"
        )
    bad = ~torch.isfinite(waveform)
    if bool(bad.any()):
        raise AudioError(
            f"audio from {source!r} holds {int(bad.sum())} NaN or infinite samples of "
            f"{bad.numel()}; clean the waveform first"
        )
    peak = float(waveform.abs().max())
    if peak > LOUDEST_FLOAT:  # e.g. int16 PCM cast to float: the model hears it ~90 dB too loud
        warn_caller(
            f"audio from {source!r} peaks at {peak:g}, while float samples are read as lying in "
            "[-1, 1]: integer PCM cast to float must be scaled (int16: divide by 32768) or "
            "passed with its integer dtype"
        )
    return waveform.mean(dim=0).contiguous(), int(sample_rate), source


def _as_float(samples: Tensor) -> Tensor:
    """Integer PCM -> float32 in [-1, 1]; floats stay as they are."""
    if samples.dtype == torch.uint8:
        return (samples.float() - 128.0) / 128.0
    if samples.dtype in _INT_SCALE:
        return samples.float() / _INT_SCALE[samples.dtype]
    if samples.dtype == torch.int64:
        raise AudioError(
            "int64 samples have no PCM scale; pass float samples in [-1, 1] or int16/int32 PCM"
        )
    if samples.dtype == torch.bool or samples.is_complex():
        raise AudioError(f"audio samples must be real numbers, got {samples.dtype}")
    return samples.float()


def resample(waveform: Tensor, orig_rate: int, new_rate: int) -> Tensor:
    """Resample a waveform with ``torchaudio.functional.resample``.

    Args:
        waveform (Tensor): ``(..., n_samples)``.
        orig_rate (int): its sample rate.
        new_rate (int): the wanted rate.

    Returns:
        Tensor: ``(..., n_samples * new_rate / orig_rate)``.
    """
    if orig_rate == new_rate:
        return waveform
    import torchaudio.functional as F

    return F.resample(waveform, orig_rate, new_rate)


def quietest_point(waveform: Tensor, sample_rate: int, start: float, end: float) -> float:
    """The time in ``[start, end]`` seconds of the 10 ms frame with the least energy.

    Args:
        waveform (Tensor): ``(n_samples,)``.
        sample_rate (int): its sample rate.
        start (float): start of the search, seconds.
        end (float): end of the search, seconds.

    Returns:
        float: the middle of the quietest frame (``start`` when the range is empty).
    """
    hop = max(1, sample_rate // 100)
    first, last = round(start * sample_rate), round(end * sample_rate)
    if last - first < hop:
        return (start + end) / 2
    frames = waveform[first:last].unfold(0, hop, hop)  # (n_frames, hop)
    energy = frames.pow(2).mean(dim=1)
    k = int(energy.argmin())
    return (first + k * hop + hop / 2) / sample_rate


class ForcedAligner:
    """Word time spans of a transcript in a clip, by CTC forced alignment.

    Any Hugging Face character-CTC model (``Wav2Vec2ForCTC``, ``ParakeetForCTC``,
    ... anything ``AutoModelForCTC`` loads) gives character emissions;
    ``torchaudio.functional.forced_align`` aligns the transcript's characters to
    them; each boundary between two words is moved to the quietest 10 ms frame
    between the last character of one and the first of the next.

    Args:
        model (str or CTC model): hub id / local path, or a loaded model.
        processor (optional): its processor (feature extractor + character
            tokenizer, e.g. ``Wav2Vec2Processor``); loaded with the model when
            ``model`` is a name.
        device (str or torch.device, optional): Default: the model's.

    Examples::

        >>> aligner = ForcedAligner("facebook/wav2vec2-base-960h")
        >>> aligner.align(wave, 16000, "what is the capital of france")
        [(0.12, 0.31, 'what'), (0.31, 0.42, 'is'), ...]
    """

    sample_rate = 16_000

    def __init__(self, model: Any, processor: Any = None, device: Any = None) -> None:
        if isinstance(model, str):
            from transformers import AutoModelForCTC, AutoProcessor

            processor = processor or AutoProcessor.from_pretrained(model)
            model = AutoModelForCTC.from_pretrained(model)
        if processor is None:
            raise AudioError(
                "ForcedAligner needs the model's processor (feature extractor + tokenizer)"
            )
        self.model = model.eval() if device is None else model.to(device).eval()
        self.processor = processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def align(
        self, waveform: Tensor, sample_rate: int, transcript: str
    ) -> list[tuple[float, float, str]]:
        """Align a transcript to a clip.

        Args:
            waveform (Tensor): ``(n_samples,)`` mono samples.
            sample_rate (int): their rate.
            transcript (str): the words spoken, in order (a word as
                :func:`~captum_mllm.words.spoken_word_spans` reads it: a Chinese
                character alone, Thai and Japanese cut as their text is).

        Returns:
            list of (start_s, end_s, word): one span per word of the transcript.
        """
        import torchaudio.functional as F

        words = [transcript[a:b] for a, b in spoken_word_spans(transcript)]
        if not words:
            raise AlignmentError("the transcript is empty")
        wave = resample(waveform, sample_rate, self.sample_rate)
        tokenizer = self.processor.tokenizer
        features = self.processor.feature_extractor(
            wave.numpy(), sampling_rate=self.sample_rate, return_tensors="pt"
        )  # input_values (raw-audio models) or input_features (log-mel models)
        with torch.no_grad():
            logits = self.model(**{k: v.to(self.device) for k, v in features.items()}).logits
            emissions = logits.float().log_softmax(-1).cpu()  # (1, T, V)
        vocab = tokenizer.get_vocab()
        # Punctuation is not spoken: aligned without it, kept in the words' labels
        unknown = sorted(
            {c for w in words for c in w if _char_id(vocab, c) is None and not is_punctuation(c)}
        )
        if unknown:
            raise AlignmentError(
                f"the aligner's vocabulary lacks the characters {unknown} of the transcript "
                f"{transcript!r}; write them as it spells words (e.g. digits as words)"
            )
        word_ids = [[i for c in w if (i := _char_id(vocab, c)) is not None] for w in words]
        silent = [w for w, ids in zip(words, word_ids, strict=True) if not ids]
        if silent:
            raise AlignmentError(
                f"the transcript's words {silent} hold no letter the aligner spells; "
                "join them to a neighbouring word or drop them"
            )
        targets = torch.tensor([[i for ids in word_ids for i in ids]], dtype=torch.int32)
        blank = tokenizer.pad_token_id or 0
        if targets.shape[1] == 0 or emissions.shape[1] < targets.shape[1]:
            raise AudioError("the clip is too short for its transcript, or no character is known")
        aligned, scores = F.forced_align(emissions, targets, blank=blank)
        spans = F.merge_tokens(aligned[0], scores[0].exp(), blank=blank)  # one span per character
        seconds = len(wave) / self.sample_rate / emissions.shape[1]  # per emission frame
        out: list[tuple[float, float, str]] = []
        first = 0
        for word, ids in zip(words, word_ids, strict=True):
            chars = spans[first : first + len(ids)]
            first += len(ids)
            out.append((chars[0].start * seconds, chars[-1].end * seconds, word))
        # Move each boundary between words to the quietest frame between them.
        for i in range(len(out) - 1):
            gap_start, gap_end = out[i][1], out[i + 1][0]
            cut = quietest_point(wave, self.sample_rate, gap_start, gap_end)
            out[i] = (out[i][0], cut, out[i][2])
            out[i + 1] = (cut, out[i + 1][1], out[i + 1][2])
        return [(round(s, 4), round(e, 4), w) for s, e, w in out]


def _char_id(vocab: dict[str, int], char: str) -> int | None:
    """The aligner's id of a character, in whichever case its vocabulary has it."""
    return next((vocab[c] for c in (char, char.upper(), char.lower()) if c in vocab), None)


@dataclass(frozen=True, eq=False)
class ClipRef:
    """One audio clip of the explained chat, for plots and reports.

    Holds the samples, or only the file they came from (``waveform`` None),
    read back with soundfile when drawn.

    Attributes:
        turn (int): the chat turn holding the clip.
        sample_rate (int): samples per second.
        waveform (Tensor or None): mono samples ``(n,)``.
        path (str or None): the audio file the clip was read from.
        sha256 (str or None): digest of the explained samples, checked when
            they are read back from ``path``.
    """

    turn: int
    sample_rate: int
    waveform: Tensor | None = None
    path: str | None = None
    sha256: str | None = None

    def samples(self) -> Tensor:
        """The clip's samples (read from ``path`` when not embedded).

        Raises:
            AudioError: the file is unreadable, or no longer holds the samples
                that were explained.
        """
        if self.waveform is not None:
            return self.waveform
        wave, rate, _ = load_audio(str(self.path))
        wave = resample(wave, rate, self.sample_rate)
        if self.sha256 is not None and digest(wave) != self.sha256:
            raise AudioError(
                f"{self.path} has changed since it was explained: its samples are not the "
                "ones the attributions are about; restore it, or save results with "
                "embed_audio=True"
            )
        return wave

    @property
    def duration(self) -> float:
        """Length in seconds (read from the file's header when not embedded)."""
        if self.waveform is not None:
            return len(self.waveform) / self.sample_rate
        import soundfile as sf

        path = os.path.abspath(str(self.path))
        if not os.path.exists(path):  # as samples() says it, not soundfile's "System error"
            raise AudioError(f"no audio file at {path}")
        try:
            return float(sf.info(path).duration)
        except Exception as exc:  # soundfile raises several types
            raise AudioError(f"cannot read audio from {path!r}: {exc}") from exc
