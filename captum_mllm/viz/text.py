"""Every text of a figure drawn as the characters it holds."""

from __future__ import annotations

from typing import Any

from captum_mllm.viz.bidi import shown_controls
from captum_mllm.viz.fonts import use_fallback_fonts


def as_written(fig: Any) -> None:
    """Draw every text of ``fig`` as the characters it holds: never as
    mathtext (matplotlib read a prompt's ``$5 and $10`` as a formula, and drew
    ``5and10`` in italics), with its bidirectional controls shown by name
    (:func:`~captum_mllm.viz.bidi.shown_controls`: a right-to-left override
    reversed the rest of a label), and in fonts that hold its characters
    (:func:`~captum_mllm.viz.fonts.use_fallback_fonts`).

    Args:
        fig (Figure): a matplotlib figure, changed in place.
    """
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        if "$" in text.get_text():  # our labels; a formatter's numbers keep their mathtext
            text.set_parse_math(False)
        shown = shown_controls(text.get_text())
        if shown != text.get_text():
            text.set_text(shown)
    use_fallback_fonts(fig)
