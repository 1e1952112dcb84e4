"""The whole conversation in one matplotlib figure, turn by turn.

Text features are boxes behind their words, audio features strips on their
clip's time axis, both coloured on Captum's red-white-green scale centred on
0; fixed text is grey. Every feature's patches carry ``gid="feature-<i>"``.
"""

from __future__ import annotations

import bisect
import itertools
import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from captum_mllm.errors import PlotError, require_int
from captum_mllm.viz.bidi import (
    CONTROLS,
    base_level,
    is_plain,
    levels,
    shown_controls,
    visual_runs,
)
from captum_mllm.viz.text import as_written
from captum_mllm.words import UNSPACED, is_punctuation

if TYPE_CHECKING:
    from captum_mllm.result import MultimodalLLMAttributionResult

_RLM = "\u200f"  # right-to-left mark: an invisible strong right-to-left character
_LINE = 1.0  # height of a text line, in data units (one unit = one character wide)


def plot_chat_attr(
    result: MultimodalLLMAttributionResult,
    target_token_pos: int | tuple[int, int] | None = None,
    width: int = 80,
    figsize: tuple[float, float] | None = None,
    show: bool = False,
) -> tuple[Any, Any] | None:
    """See :meth:`MultimodalLLMAttributionResult.plot_chat_attr`."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    if not result.segments:
        raise PlotError("this result has no chat (a Captum input): use plot_seq_attr")
    require_int("width", width, 1)  # 0 or less drew every word on a line of its own
    attr = result._row(target_token_pos, PlotError)
    bound = float(attr.abs().max()) or 1.0
    norm = Normalize(vmin=-bound, vmax=bound)
    cmap = result._get_plot_color_map()
    items: list[tuple[str, Any]] = []  # drawing commands, laid out top to bottom
    y = 0.0
    for turn in result.segments:
        items.append(("role", (y, turn["role"])))
        y += _LINE
        for part in turn["parts"]:
            if "audio" in part:
                items.append(("clip", (y, part["audio"])))
                y += 2 * _LINE
                continue
            pieces = _wrapped(_printable(part["text"]), width)
            for x, line, piece, feature in pieces:
                items.append(("text", (x, y + line * _LINE, piece, feature)))
            y += (max((line for _, line, _, _ in pieces), default=0) + 1.4) * _LINE
    height = y + _LINE
    fig, ax = plt.subplots(figsize=figsize or (max(6.0, width * 0.11), max(2.0, height * 0.32)))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.03)
    bar.ax.set_ylabel("Attribution", rotation=-90, va="bottom")
    # a character nearly a unit wide, so that text fills its box: a monospace one
    # advances 0.6 of its size, and up to 0.62 once its advance is rounded to pixels
    size = 72 * fig.get_size_inches()[0] * ax.get_position().width / width / 0.65
    for kind, args in items:
        if kind == "role":
            ax.text(0, args[0], args[1].upper(), fontsize=7, color="#777", va="top")
        elif kind == "text":
            x, ty, piece, feature = args
            if feature >= 0 and not piece.isspace():  # a space alone ends a line
                colour = cmap(norm(float(attr[feature])))
                box = Rectangle((x, ty + 0.1), cells(piece), 0.8, facecolor=colour, ec="none")
                box.set_gid(f"feature-{feature}")
                ax.add_patch(box)
            ink = "black" if feature >= 0 else "#999"
            style = {"family": "monospace", "fontsize": size, "va": "center", "color": ink}
            _draw_text(ax, x, ty + 0.5, piece, **style)
        else:
            cy, clip = args
            _strip(ax, result, clip, cy, width, attr, norm, cmap)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ax.set_title(f"Attribution to {result._what(target_token_pos)}", fontsize=9, loc="left", pad=10)
    as_written(fig)
    if show:
        plt.show()
        return None
    return fig, ax


def _wrapped(runs: Sequence[Sequence[Any]], width: int) -> list[tuple[int, int, str, int]]:
    """Lay ``(text, feature)`` runs out in lines of ``width`` cells as ``(x, line,
    text, feature)`` pieces (a wide character, as in Chinese, takes two cells,
    as in a terminal). Lines break at spaces, inside a run too (a turn or a
    sentence is one run), and at line breaks; a word moves to the next line
    whole, with what is glued to it ("sunset" and its ","); only a word longer
    than a line is cut. A line of a right-to-left paragraph (Hebrew, Arabic)
    is laid out from the right, its pieces in reading order
    (:func:`_reading_order`)."""
    words: list[list[tuple[str, int]]] = []  # chunks with no space between them
    for text, feature in runs:
        for chunk in re.findall(r"\n|[^\S\n]+|\S+", text):
            before = words[-1][-1][0] if words else " "
            if not chunk[0].isspace() and not before[0].isspace() and not _breaks(before, chunk):
                words[-1].append((chunk, feature))
            else:
                words.append([(chunk, feature)])
    pieces: list[tuple[int, int, str, int]] = []
    x = line = 0
    starts = [0]  # the first line of each paragraph
    for word in words:
        length = sum(cells(chunk) for chunk, _ in word)
        if word[0][0] == "\n":
            x, line = 0, line + 1
            starts.append(line)
            continue
        if word[0][0].isspace():  # spaces end where the line does
            word = [(word[0][0][: width - x], word[0][1])]
        elif x + length > width and x > 0:
            x, line = 0, line + 1
        for chunk, feature in word:
            while chunk:
                piece, rest = _cut(chunk, width - x)
                if not piece and x > 0:  # a word longer than a line, a wide character at its end
                    x, line = 0, line + 1
                    continue
                piece, chunk = (piece, rest) if piece else (chunk[0], chunk[1:])  # width 1
                last = pieces[-1] if pieces else (-1, -1, "", -2)
                if (last[1], last[3], last[0] + cells(last[2])) == (line, feature, x):
                    pieces[-1] = (last[0], line, last[2] + piece, feature)  # one box a run a line
                else:
                    pieces.append((x, line, piece, feature))
                x += cells(piece)
    bases = [base_level(p) for p in "".join(text for text, _ in runs).split("\n")]
    return _reading_order(pieces, starts, bases, width)


def _reading_order(
    pieces: list[tuple[int, int, str, int]], starts: list[int], bases: list[int], width: int
) -> list[tuple[int, int, str, int]]:
    """The pieces of each line placed as Unicode's bidirectional algorithm
    draws the line (:mod:`captum_mllm.viz.bidi`): a right-to-left paragraph's
    lines end at the right margin, and a run of right-to-left words reads
    from the right. A piece keeps its characters in logical order (matplotlib
    orders those it draws), so a piece is cut where runs of another direction meet."""
    out: list[tuple[int, int, str, int]] = []
    for line, group in itertools.groupby(pieces, key=lambda piece: piece[1]):
        row = list(group)
        base = bases[bisect.bisect_right(starts, line) - 1]
        text = "".join(piece[2] for piece in row)
        if base == 0 and is_plain(text):
            out.extend(row)
            continue
        feature = [f for _, _, piece, f in row for _ in piece]
        lev = levels(text, base)
        x = width - cells(text) if base else 0
        for start, end in visual_runs(lev):
            spans: list[tuple[int, int]] = []  # one a feature, in logical order
            for k in range(start, end):
                if spans and feature[k] == feature[spans[-1][0]]:
                    spans[-1] = (spans[-1][0], k + 1)
                else:
                    spans.append((k, k + 1))
            for a, b in spans[::-1] if lev[start] % 2 else spans:
                piece = text[a:b]
                if lev[a] % 2 and base_level(piece) == 0 and not piece.isspace():
                    piece = _RLM + piece  # drawn alone, "»." or "(" would read left to right
                out.append((x, line, piece, feature[a]))
                x += cells(piece)
    return out


def _breaks(before: str, after: str) -> bool:
    """Whether a line may break between two runs with no space between them:
    at a letter of a script written without spaces (Chinese, Japanese, Thai:
    a Thai word was cut across two lines), never before punctuation nor after
    an opening bracket or quote."""
    if is_punctuation(after[0]) or unicodedata.category(before[-1]) in ("Ps", "Pi"):
        return False
    return bool(UNSPACED.match(after) or UNSPACED.match(before[-1]))


def _printable(runs: Sequence[Sequence[Any]], tab: int = 4) -> list[tuple[str, int]]:
    """The runs as a terminal shows them: a tab as spaces to the next stop of
    ``tab`` cells, ``\r\n`` and ``\r`` as line breaks, other control
    characters left out (each was drawn as a box for a glyph no font has),
    bidirectional controls by name (``⟨RLO⟩``)."""
    out: list[tuple[str, int]] = []
    column, previous = 0, ""
    for text, feature in runs:
        kept = []
        for char in text:
            if char == "\n" and previous == "\r":  # the break \r already made
                previous = char
                continue
            previous = char
            if char == "\t":
                char = " " * (tab - column % tab)
            elif char in CONTROLS:  # an override would reverse what follows it
                char = shown_controls(char)
            elif char == "\r":
                char = "\n"
            elif unicodedata.category(char) == "Cc" and char != "\n":
                continue
            kept.append(char)
            column = 0 if char == "\n" else column + cells(char)
        out.append(("".join(kept), feature))
    return out


def cells(text: str) -> int:
    """Cells ``text`` takes in a monospace layout, as a terminal counts them:
    two for a wide or fullwidth character (Chinese, Japanese, Korean;
    Unicode's East Asian Width W or F), none for a combining mark or an
    invisible format character (drawn over the letter before, or not at all)."""
    return sum(_cell(c) for c in text)


def _cell(char: str) -> int:
    if unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def _cut(text: str, room: int) -> tuple[str, str]:
    """The longest head of ``text`` that fits in ``room`` cells, and the rest."""
    used = 0
    for k, char in enumerate(text):
        used += cells(char)
        if used > room:
            return text[:k], text[k:]
    return text, ""


def _draw_text(ax: Any, x: float, y: float, piece: str, **style: Any) -> None:
    """``piece`` from cell ``x``: each wide character centred in its two cells
    (its font's glyph is narrower than two monospace ones), the rest in runs."""
    start, run = x, ""
    for char in piece:
        if cells(char) == 2:
            if run:
                ax.text(start, y, run, **style)
            ax.text(x + 1, y, char, ha="center", **style)
            start, run = x + 2, ""
        else:
            run += char
        x += cells(char)
    if run:
        ax.text(start, y, run, **style)


def _strip(
    ax: Any, result: Any, clip: int, y: float, width: int, attr: Any, norm: Any, cmap: Any
) -> None:
    """One clip as a time axis of ``width`` units with a strip per audio feature."""
    from matplotlib.patches import Rectangle

    duration = result.clips[clip].duration
    scale = width / duration
    ax.add_patch(Rectangle((0, y + 0.2), width, 1.4, facecolor="#f2f2f2", edgecolor="#bbb"))
    for f, feature in enumerate(result.features or []):
        if feature.clip != clip or feature.time is None:
            continue
        start, end = feature.time
        strip = Rectangle((start * scale, y + 0.2), (end - start) * scale, 1.4,
                          facecolor=cmap(norm(float(attr[f]))), edgecolor="white")  # fmt: skip
        strip.set_gid(f"feature-{f}")
        ax.add_patch(strip)
    for second in range(int(duration) + 1):
        ax.text(second * scale, y + 1.95, f"{second}s", fontsize=6, ha="center", color="#777")
