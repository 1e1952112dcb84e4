"""Every text of a figure drawn as the characters it holds."""

from __future__ import annotations

from typing import Any

from captum_mllm.viz.fonts import use_fallback_fonts


def as_written(fig: Any) -> None:
    """Draw every text of ``fig`` as the characters it holds: never as
    mathtext (matplotlib read a prompt's ``$5 and $10`` as a formula, and drew
    ``5and10`` in italics), and in fonts that hold its characters
    (:func:`~captum_mllm.viz.fonts.use_fallback_fonts`).

    Args:
        fig (Figure): a matplotlib figure, changed in place.
    """
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        if "$" in text.get_text():  # our labels; a formatter's numbers keep their mathtext
            text.set_parse_math(False)
    use_fallback_fonts(fig)
