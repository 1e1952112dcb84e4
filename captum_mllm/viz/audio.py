"""Attribution drawn on the sound: waveform and log-mel spectrogram with each
audio feature's span shaded in Captum's red-white-green scale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from captum_mllm.errors import PlotError
from captum_mllm.viz.text import as_written

if TYPE_CHECKING:
    from captum_mllm.audio import ClipRef
    from captum_mllm.result import MultimodalLLMAttributionResult


def plot_audio_attr(
    result: MultimodalLLMAttributionResult,
    turn: int | None = None,
    clip: int = 0,
    target_token_pos: int | tuple[int, int] | None = None,
    show: bool = False,
    figsize: tuple[float, float] | None = None,
) -> tuple[Any, Any] | None:
    """Draw one clip's waveform over its log-mel spectrogram, each audio feature's
    span shaded with the colour of its attribution. See
    :meth:`MultimodalLLMAttributionResult.plot_audio_attr`."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    part, index = _clip(result, turn, clip)
    attr = result._row(target_token_pos, PlotError)
    features = [(i, f) for i, f in enumerate(result.features or []) if f.clip == index and f.time]
    if not features:
        raise PlotError(f"clip {index} has no audio features in this result")

    wave = part.samples().float()
    duration = len(wave) / part.sample_rate
    seconds = np.arange(len(wave)) / part.sample_rate
    values = attr[[i for i, _ in features]]
    bound = float(values.abs().max()) or 1.0
    norm = Normalize(vmin=-bound, vmax=bound)  # 0 stays white, as in plot_token_attr
    cmap = result._get_plot_color_map()

    # A sane size whatever the clip's length (long clips: labels only where they fit).
    figsize = figsize or (min(16.0, max(8.0, 3.0 * duration)), 5.0)
    # Constrained layout keeps the span labels above the waveform clear of the title.
    fig, (ax_wave, ax_mel) = plt.subplots(
        2, 1, sharex=True, figsize=figsize, gridspec_kw={"height_ratios": [1, 2]},
        layout="constrained",
    )  # fmt: skip
    fig.suptitle(f"Attribution to {result._what(target_token_pos)}", fontsize=9, x=0.01, ha="left")
    room = max(1, int(figsize[0] * 5))  # labels that fit side by side, at 8 pt
    labelled = set(values.abs().argsort(descending=True)[:room].tolist())
    ax_wave.plot(seconds, wave.numpy(), color="black", linewidth=0.5)
    ax_wave.set_ylabel("amplitude")
    mel = _log_mel(wave, part.sample_rate)
    ax_mel.imshow(
        mel, origin="lower", aspect="auto", cmap="gray_r",
        extent=(0.0, duration, 0.0, float(mel.shape[0])),
    )  # fmt: skip
    ax_mel.set_ylabel("mel bin")
    ax_mel.set_xlabel("time (s)")
    for k, ((_, feature), value) in enumerate(zip(features, values.tolist(), strict=True)):
        start, end = feature.time  # type: ignore[misc]
        colour = cmap(norm(value))
        for ax in (ax_wave, ax_mel):
            ax.axvspan(
                start, end, facecolor=colour, alpha=0.6, edgecolor="none", label=feature.label
            )
        if k in labelled:  # the largest |attributions| when not all fit
            ax_wave.text(
                (start + end) / 2, 1.02, feature.label, transform=ax_wave.get_xaxis_transform(),
                rotation=90, ha="center", va="bottom", fontsize=8,
            )  # fmt: skip
    ax_wave.set_xlim(0.0, duration)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=[ax_wave, ax_mel])
    bar.ax.set_ylabel("Attribution", rotation=-90, va="bottom")
    fig.set_facecolor("white")
    as_written(fig)  # aligned words in any script, with any characters
    if show:
        plt.show()
        return None
    return fig, (ax_wave, ax_mel)


def _clip(
    result: MultimodalLLMAttributionResult, turn: int | None, clip: int
) -> tuple[ClipRef, int]:
    """The clip asked for and its index among all clips in chat order."""
    clips = result.clips or []
    if not clips or not result.features:
        raise PlotError("this result has no audio: explain a ChatInput with audio parts")
    n_turns = len(result.roles or [])
    if turn is not None and not (0 <= turn < n_turns):
        raise PlotError(f"turn {turn} does not exist; the chat has {n_turns} turns")
    candidates = [i for i, c in enumerate(clips) if turn is None or c.turn == turn]
    if not candidates:
        raise PlotError(f"turn {turn} holds no audio")
    if not 0 <= clip < len(candidates):
        raise PlotError(f"clip {clip} does not exist; there are {len(candidates)} clips")
    index = candidates[clip]
    return clips[index], index


def _log_mel(wave: torch.Tensor, sample_rate: int) -> np.ndarray:
    """``(n_mels, frames)`` log-mel spectrogram, 25 ms windows every 10 ms."""
    import torchaudio

    spec = torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate,
        n_fft=int(0.025 * sample_rate),
        hop_length=int(0.010 * sample_rate),
        n_mels=64,
    )(wave)
    return (spec + 1e-10).log10().numpy()
