"""Fonts for the characters a figure writes.

matplotlib draws a character its font lacks as an empty box (with a "Glyph
missing" warning), and its default DejaVu fonts hold no Chinese, Japanese,
Korean, Thai or Devanagari. Each text of our figures whose font lacks some of
its characters gets, after its own fonts, installed fonts that hold them:
matplotlib then falls back from one font to the next, glyph by glyph.

Characters no installed font holds get one warning of ours, naming them,
rather than matplotlib's, one per character and font at every drawing (the
command line wrote 37 lines for a Chinese question on a machine without a
Chinese font).
"""

from __future__ import annotations

import contextlib
import functools
import unicodedata
import warnings
from collections.abc import Iterator
from typing import Any

from captum_mllm.errors import warn_caller
from captum_mllm.words import is_separator

#: Characters named in the warning; the rest are counted.
NAMED = 10
#: Characters named already: each once a session, as Python shows a warning once
#: a place (several figures of one result hold the same ones).
_WARNED: set[str] = set()


def use_fallback_fonts(fig: Any) -> None:
    """Give each text of ``fig`` fonts for the characters its own fonts lack.

    Fonts are chosen among matplotlib's installed fonts, the fewest that hold
    the most of the missing characters. Characters no installed font holds
    (drawn as empty boxes) are named in one warning, each once a session.

    Args:
        fig (Figure): a matplotlib figure, changed in place.
    """
    from matplotlib.text import Text

    held: dict[tuple[Any, ...], frozenset[int]] = {}  # by font: a heatmap has thousands of texts
    unheld: dict[str, None] = {}  # in the order the figure holds them
    for text in fig.findobj(Text):
        chars = _drawn(text.get_text())
        if not chars:
            continue
        prop = text.get_fontproperties()
        key = (tuple(prop.get_family()), prop.get_style(), prop.get_weight())
        if key not in held:
            held[key] = frozenset().union(*(_charmap(p) for p in _font_files(prop)))
        extra, left = fallback_families(chars - held[key])
        if extra:
            text.set_fontfamily([*key[0], *(f for f in extra if f not in key[0])])
        unheld.update(dict.fromkeys(c for c in text.get_text() if ord(c) in left))
    new = [c for c in unheld if c not in _WARNED]
    if new:
        _WARNED.update(new)
        more = f" and {len(new) - NAMED} more" if len(new) > NAMED else ""
        warn_caller(
            f"no installed font holds {' '.join(map(_alone, new[:NAMED]))}{more}: figures draw "
            "them as empty boxes; install a font that holds them (e.g. Noto: Debian's "
            "fonts-noto-cjk for Chinese, Japanese and Korean, fonts-noto-core for other scripts)"
        )


@contextlib.contextmanager
def glyph_warnings_muted() -> Iterator[None]:
    """Drawings inside leave out matplotlib's "Glyph ... missing from font(s)"
    warnings: :func:`use_fallback_fonts` has named those characters once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Glyph \d+ .*missing from font", UserWarning)
        yield


def _alone(char: str) -> str:
    """``char`` as written alone: a combining mark on a dotted circle, as
    Unicode's charts show one (alone it joined the space before it)."""
    return f"\u25cc{char}" if unicodedata.category(char).startswith("M") else char


def fallback_families(missing: frozenset[int]) -> tuple[list[str], set[int]]:
    """Installed font families that hold the ``missing`` characters (code
    points): the fewest that hold the most of them; and those none holds."""
    left = set(missing)
    chosen: list[str] = []
    candidates = _regular_fonts() if left else []
    while left:  # greedy: the font holding the most of what is still missing
        name, covered = max(
            ((name, left & _charmap(path)) for name, path in candidates),
            key=lambda item: len(item[1]),
            default=("", set()),
        )
        if not covered:
            break
        chosen.append(name)
        left -= covered
    return chosen, left


def _font_files(prop: Any) -> list[str]:
    """The files of the installed fonts ``prop``'s families name, in order (the
    fonts matplotlib falls back through)."""
    from matplotlib import font_manager

    files: list[str] = []
    for family in prop.get_family():
        one = prop.copy()
        one.set_family(family)
        try:
            files.append(str(font_manager.findfont(one, fallback_to_default=False)))
        except ValueError:  # not installed: matplotlib skips it too
            continue
    return files


def _drawn(text: str) -> frozenset[int]:
    """The code points of ``text`` a font must draw (not separators: spaces,
    controls, zero-width format characters)."""
    return frozenset(ord(c) for c in text if not is_separator(c))


def _regular_fonts() -> list[tuple[str, str]]:
    """(family, file) of each installed family's face nearest upright and normal weight."""
    from matplotlib import font_manager

    best: dict[str, tuple[tuple[bool, float], str]] = {}
    for entry in font_manager.fontManager.ttflist:
        if entry.name.startswith("Last Resort"):  # a box for every character: no better
            continue
        weight = entry.weight
        weight = font_manager.weight_dict.get(weight, 400) if isinstance(weight, str) else weight
        rank = (entry.style != "normal", abs(float(weight) - 400))
        if entry.name not in best or rank < best[entry.name][0]:
            best[entry.name] = (rank, entry.fname)
    return sorted((name, path) for name, (_, path) in best.items())


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    """The code points a font file draws; none for a font matplotlib cannot
    scale (colour bitmap emoji fonts), which would fail the drawing."""
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(path)
        font.set_size(12, 72)
        return frozenset(font.get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()
