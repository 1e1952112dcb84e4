"""Keep Captum's feature tick labels readable when there are many of them."""

from __future__ import annotations

import math
from typing import Any

#: Characters of a tick label; longer ones end in an ellipsis (the result keeps them whole).
MAX_LABEL = 32


def _short(text: str) -> str:
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1].rstrip() + "…"


def fit_tick_labels(fig: Any, ax: Any) -> None:
    """Stand long or many x tick labels upright and shrink them so none overlap;
    cut labels longer than :data:`MAX_LABEL` characters (sentences) with an ellipsis.

    Captum rotates labels by -30 degrees, which overlaps for long labels such as
    ``audio[1.20-1.60s]`` once there are a few dozen features.

    Args:
        fig (Figure): the figure.
        ax (Axes): the axes whose x tick labels to fit.
    """
    labels = ax.get_xticklabels()
    if not labels:
        return
    texts = [label.get_text() for label in labels]
    if any(len(t) > MAX_LABEL for t in texts):  # a sentence feature: the bars keep their room
        ax.set_xticks(ax.get_xticks(), [_short(t) for t in texts])
        labels = ax.get_xticklabels()
    width_in = fig.get_size_inches()[0] * ax.get_position().width
    spacing_pt = 72 * width_in / len(labels)  # room per label, in points
    size = max(5.0, min(10.0, 0.8 * spacing_pt))  # an upright label is one line high
    every = max(1, math.ceil(size / max(spacing_pt, 1e-9)))  # too many: label every k-th
    on_top = ax.xaxis.get_major_ticks()[0].label2.get_visible()  # Captum puts them on top
    for i, label in enumerate(labels):
        label.set_visible(i % every == 0)
        label.set_rotation(90)
        label.set_rotation_mode("default")
        label.set_horizontalalignment("center")
        label.set_verticalalignment("bottom" if on_top else "top")
        label.set_fontsize(size)
