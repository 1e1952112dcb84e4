"""Audio I/O as pure functions: read with soundfile, resample with torchaudio.

Waveforms are mono float32 tensors of shape ``(n_samples,)`` with an explicit
sample rate.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captum_mllm.errors import AudioError


def load_audio(audio: Any, sample_rate: int | None = None) -> tuple[Tensor, int, str]:
    """Read audio from a path, bytes, a numpy array or a tensor, as mono.

    Args:
        audio (str, PathLike, bytes, ndarray or Tensor): the audio. Arrays and
            tensors are ``(n_samples,)`` or ``(channels, n_samples)``.
        sample_rate (int, optional): required for arrays and tensors; ignored
            for files, whose header says it.

    Returns:
        tuple: ``(waveform (n_samples,), sample_rate, source label)``.

    Examples::

        >>> wave, sr, _ = load_audio("question.wav")
    """
    if isinstance(audio, str | os.PathLike | bytes | bytearray):
        import soundfile as sf

        source = os.fspath(audio) if not isinstance(audio, bytes | bytearray) else "<bytes>"
        handle = io.BytesIO(audio) if isinstance(audio, bytes | bytearray) else audio
        try:
            data, sample_rate = sf.read(handle, dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises several types for bad files
            raise AudioError(f"cannot read audio from {source!r}: {exc}") from exc
        waveform = torch.from_numpy(data.T.copy())  # (channels, n)
    elif isinstance(audio, np.ndarray | Tensor):
        if sample_rate is None:
            raise AudioError("audio given as an array needs its sample_rate=")
        source = "<array>"
        waveform = torch.as_tensor(np.asarray(audio) if isinstance(audio, np.ndarray) else audio)
        if waveform.dim() == 1:  # (n,) -> (1, n)
            waveform = waveform[None]
        waveform = waveform.float()
    else:
        raise AudioError(f"cannot read audio of type {type(audio).__name__}")
    if sample_rate is None or int(sample_rate) <= 0:
        raise AudioError(f"invalid sample rate {sample_rate!r}")
    if waveform.dim() != 2 or waveform.shape[-1] == 0:
        raise AudioError(f"audio from {source!r} is empty")
    if bool(torch.isnan(waveform).all()):
        raise AudioError(f"audio from {source!r} holds only NaN")
    mono = torch.nan_to_num(waveform.mean(dim=0))
    return mono.contiguous(), int(sample_rate), source


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
