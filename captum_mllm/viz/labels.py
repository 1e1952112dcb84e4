"""Keep Captum's tick labels and heatmap values readable when there are many of them."""

from __future__ import annotations

import math
from typing import Any

#: Characters of a tick label; longer ones end in an ellipsis (the result keeps them whole).
MAX_LABEL = 32
#: Font sizes (points) of labels and cell values: Captum's default, and the smallest drawn.
MAX_FONT, MIN_FONT = 10.0, 5.0


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
    size, every = _one_line_each(fig.get_size_inches()[0] * ax.get_position().width, len(labels))
    on_top = ax.xaxis.get_major_ticks()[0].label2.get_visible()  # Captum puts them on top
    for i, label in enumerate(labels):
        label.set_visible(i % every == 0)
        label.set_rotation(90)
        label.set_rotation_mode("default")
        label.set_horizontalalignment("center")
        label.set_verticalalignment("bottom" if on_top else "top")
        label.set_fontsize(size)


def fit_heatmap(fig: Any, ax: Any) -> None:
    """Fit Captum's token heatmap to its size: output-token (y) labels as
    :func:`fit_tick_labels` fits the x labels, and the value written in each
    cell shrunk to its cell, or left out where it would be smaller than
    :data:`MIN_FONT` points (the colour and the colour bar still show it).

    Captum writes every value at 10 points whatever the cell's size: 60 output
    tokens by 80 words drew them over each other and over the colours.

    Args:
        fig (Figure): the figure of ``plot_token_attr``.
        ax (Axes): its heatmap axes.
    """
    rows, cols = ax.images[0].get_array().shape
    box = ax.get_position()
    width_in, height_in = fig.get_size_inches()
    size, every = _one_line_each(height_in * box.height, rows)
    for i, label in enumerate(ax.get_yticklabels()):
        label.set_visible(i % every == 0)
        label.set_fontsize(size)
    if not ax.texts:
        return
    widest = max(ax.texts, key=lambda t: len(t.get_text())).get_window_extent()
    to_pt = 72 / fig.dpi
    room = min(  # the font size that fits a cell with a little margin
        0.9 * 72 * width_in * box.width / cols / (widest.width * to_pt),
        0.9 * 72 * height_in * box.height / rows / (widest.height * to_pt),
    )
    size = min(MAX_FONT, ax.texts[0].get_fontsize() * room)
    for text in list(ax.texts):
        if size < MIN_FONT:
            text.remove()
        else:
            text.set_fontsize(size)


def _one_line_each(length_in: float, count: int) -> tuple[float, int]:
    """Font size of ``count`` one-line labels along ``length_in`` inches, and k
    such that every k-th label fits when not all do."""
    spacing_pt = 72 * length_in / count  # room per label, in points
    size = max(MIN_FONT, min(MAX_FONT, 0.8 * spacing_pt))
    return size, max(1, math.ceil(size / max(spacing_pt, 1e-9)))
