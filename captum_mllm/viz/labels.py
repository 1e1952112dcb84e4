"""Keep Captum's tick labels and heatmap values readable when there are many of them."""

from __future__ import annotations

import math
from typing import Any

from captum_mllm.viz.heatmap import cell_values

#: Characters of a tick label; longer ones end in an ellipsis (the result keeps them whole).
MAX_LABEL = 32
#: Font sizes (points) of labels and cell values: Captum's default, and the smallest drawn.
MAX_FONT, MIN_FONT = 10.0, 5.0


def shortened(text: str, width: int, mark: str = "…") -> str:
    """``text`` on one line, cut to ``width`` characters ending in ``mark``, at
    a space when there is one in its second half (textwrap's ``shorten``, which
    Captum's plots use, cuts at spaces only: a Chinese sentence or a URL came
    out as the mark alone)."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    room = width - len(mark)
    space = text.rfind(" ", 0, room + 1)
    return (text[:space] if space > width // 2 else text[:room]).rstrip() + mark


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
        ax.set_xticks(ax.get_xticks(), [shortened(t, MAX_LABEL) for t in texts])
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
    :data:`MIN_FONT` points (the colour and the colour bar still show it). A
    heatmap without values (:func:`~captum_mllm.viz.heatmap.token_heatmap`)
    gets them written where they fit.

    Captum writes every value at 10 points whatever the cell's size: 60 output
    tokens by 80 words drew them over each other and over the colours.

    Args:
        fig (Figure): the figure of ``plot_token_attr`` (Captum's or ours).
        ax (Axes): its heatmap axes.
    """
    rows, cols = ax.images[0].get_array().shape
    box = ax.get_position()
    width_in, height_in = fig.get_size_inches()
    size, every = _one_line_each(height_in * box.height, rows)
    for i, label in enumerate(ax.get_yticklabels()):
        label.set_visible(i % every == 0)
        label.set_fontsize(size)
    texts = list(ax.texts)
    if texts:
        sample = max(texts, key=lambda t: len(t.get_text()))
    else:  # token_heatmap writes the values once they fit
        values = ax.images[0].get_array()
        widest = max(f"{values.min():.4f}", f"{values.max():.4f}", key=len)
        sample = ax.text(0, 0, widest, fontsize=MAX_FONT)
    extent = sample.get_window_extent()
    to_pt = 72 / fig.dpi
    room = min(  # the font size that fits a cell with a little margin
        0.9 * 72 * width_in * box.width / cols / (extent.width * to_pt),
        0.9 * 72 * height_in * box.height / rows / (extent.height * to_pt),
    )
    size = min(MAX_FONT, sample.get_fontsize() * room)
    if not texts:
        sample.remove()
        if size >= MIN_FONT:
            cell_values(ax, size)
        return
    for text in texts:
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


def fit_margins(fig: Any, pad: float = 0.1) -> None:
    """Move the axes so that every label lies inside the figure, ``pad`` inches
    from its edges, keeping the figure's size.

    Captum's plots put their x labels above the axes in the default margins: a
    word of seven letters ran past the top of the figure (seen whole only when
    saved with ``bbox_inches="tight"``, as Jupyter does), while the bottom
    margin stayed empty. The axes keep at least a third of their size.

    Args:
        fig (Figure): the figure.
        pad (float, optional): inches between the labels and the figure's edges.
            Default: 0.1
    """
    from matplotlib.transforms import Bbox

    width, height = fig.get_size_inches()
    drawn = fig.get_tightbbox()  # inches, labels included
    boxes = [ax.get_position() for ax in fig.axes]
    held = Bbox.union(boxes)  # the axes, in figure fractions
    new = []
    for lo, hi, size, used_lo, used_hi in (
        (held.x0, held.x1, width, drawn.x0, drawn.x1),
        (held.y0, held.y1, height, drawn.y0, drawn.y1),
    ):
        # decorations stick out past the axes by a fixed amount on each side
        out_lo, out_hi = lo - used_lo / size, used_hi / size - hi
        new_lo, new_hi = out_lo + pad / size, 1 - out_hi - pad / size
        if new_hi - new_lo < (hi - lo) / 3:  # labels too long to fit: keep the axes
            new_lo, new_hi = lo, hi
        new.append((lo, hi, new_lo, new_hi))
    (x0, x1, nx0, nx1), (y0, y1, ny0, ny1) = new
    for ax, box in zip(fig.axes, boxes, strict=True):
        ax.set_position(Bbox.from_extents(
            nx0 + (box.x0 - x0) * (nx1 - nx0) / (x1 - x0),
            ny0 + (box.y0 - y0) * (ny1 - ny0) / (y1 - y0),
            nx0 + (box.x1 - x0) * (nx1 - nx0) / (x1 - x0),
            ny0 + (box.y1 - y0) * (ny1 - ny0) / (y1 - y0),
        ))  # fmt: skip
