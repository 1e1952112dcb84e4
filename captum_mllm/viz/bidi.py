"""Right-to-left text (Hebrew, Arabic) in the chat plot's cells: which way a
line reads and where each run of it goes.

matplotlib shapes and orders the characters of one text (libraqm), but the
chat plot draws a line as many texts, a box per feature: their places are
chosen here, by Unicode's bidirectional algorithm (UAX #9) for text without
explicit embeddings (those are shown by name, never obeyed:
:func:`shown_controls`): its weak, neutral and implicit rules (W1-W7, N1-N2,
I1-I2) and the line rules (L1-L2). python-bidi gives only the reordered
string, not where each character went, which the boxes need.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

_STRONG = {"L": 0, "R": 1, "AL": 1}
#: Explicit embeddings, overrides and isolates, and the names they are shown by
CONTROLS = {
    "\u202a": "LRE", "\u202b": "RLE", "\u202c": "PDF", "\u202d": "LRO", "\u202e": "RLO",
    "\u2066": "LRI", "\u2067": "RLI", "\u2068": "FSI", "\u2069": "PDI",
}  # fmt: skip
_SHOWN = str.maketrans({c: f"\u27e8{name}\u27e9" for c, name in CONTROLS.items()})
_NEUTRAL = {"B", "S", "WS", "ON", "BN"}


def shown_controls(text: str) -> str:
    """``text`` with each explicit bidirectional control shown by name
    (U+202E as ``⟨RLO⟩``). Drawn, an override reversed what followed it
    ("Trojan Source"): a report showed words in another order than the model
    read them. Marks (LRM, RLM), which only nudge neutrals, are kept."""
    return text.translate(_SHOWN)


def base_level(text: str) -> int:
    """0 (left to right) or 1 (right to left): the first strong character's
    direction, 0 without one (rules P2-P3)."""
    for char in text:
        level = _STRONG.get(unicodedata.bidirectional(char))
        if level is not None:
            return level
    return 0


def is_plain(text: str) -> bool:
    """True when every character of ``text`` stays where it is in a left-to-right line."""
    return all(unicodedata.bidirectional(c) not in ("R", "AL", "AN") for c in text)


def levels(text: str, base: int) -> list[int]:
    """The embedding level of each character of one line of a paragraph whose
    base level is ``base``."""
    kinds = [_kind(c) for c in text]
    edge = "R" if base else "L"
    # W1: a combining mark takes the kind of what it marks
    for i, kind in enumerate(kinds):
        if kind == "NSM":
            kinds[i] = kinds[i - 1] if i else edge
    # W2, W3: a European number after Arabic letters is an Arabic one; AL is R
    strong = edge
    for i, kind in enumerate(kinds):
        if kind in ("L", "R", "AL"):
            strong = kind
        elif kind == "EN" and strong == "AL":
            kinds[i] = "AN"
    kinds = ["R" if k == "AL" else k for k in kinds]
    # W4: one separator between two numbers of a kind joins them (1,000; 3.14)
    for i in range(1, len(kinds) - 1):
        before, after = kinds[i - 1], kinds[i + 1]
        if before == after and (
            (kinds[i] == "ES" and before == "EN") or (kinds[i] == "CS" and before in ("EN", "AN"))
        ):
            kinds[i] = before
    # W5: currency and percent signs next to a European number join it
    for start, end in _spans(kinds, {"ET"}):
        if (start and kinds[start - 1] == "EN") or (end < len(kinds) and kinds[end] == "EN"):
            kinds[start:end] = ["EN"] * (end - start)
    # W6: other separators are neutral; W7: a European number after L is L
    kinds = ["ON" if k in ("ES", "ET", "CS") else k for k in kinds]
    strong = edge
    for i, kind in enumerate(kinds):
        if kind in ("L", "R"):
            strong = kind
        elif kind == "EN" and strong == "L":
            kinds[i] = "L"
    # N1, N2: neutrals between two of one direction take it (numbers read as R), else the base's
    for start, end in _spans(kinds, _NEUTRAL):
        before = _direction(kinds[start - 1]) if start else edge
        after = _direction(kinds[end]) if end < len(kinds) else edge
        kinds[start:end] = [before if before == after else edge] * (end - start)
    # I1, I2
    out = []
    for kind in kinds:
        if base == 0:
            out.append(0 if kind == "L" else 1 if kind == "R" else 2)
        else:
            out.append(1 if kind == "R" else 2)
    # L1: spaces at the line's end go back to the base level
    end = len(text)
    while end and unicodedata.bidirectional(text[end - 1]) in ("WS", "S", "BN"):
        end -= 1
        out[end] = base
    return out


def visual_runs(lev: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` spans of one level each, left to right as drawn (L2:
    from the highest level down to the lowest odd one, each run of at least
    that level reversed)."""
    order = list(range(len(lev)))
    odd = [x for x in lev if x % 2]
    for level in range(max(lev, default=0), min(odd, default=max(lev, default=0) + 1) - 1, -1):
        i = 0
        while i < len(order):
            if lev[order[i]] < level:
                i += 1
                continue
            j = i
            while j < len(order) and lev[order[j]] >= level:
                j += 1
            order[i:j] = order[i:j][::-1]
            i = j
    runs: list[tuple[int, int]] = []  # logical spans: a character next in its run's direction
    for k in order:
        if runs:
            start, end = runs[-1]
            step = -1 if lev[k] % 2 else 1
            if lev[k] == lev[start] and k == (end if step == 1 else start - 1):
                runs[-1] = (start, end + 1) if step == 1 else (k, end)
                continue
        runs.append((k, k + 1))
    return runs


def _kind(char: str) -> str:
    kind = unicodedata.bidirectional(char) or "L"
    # explicit controls are read as nothing (BN): the figures show them by name (shown_controls)
    return "BN" if char in CONTROLS else kind


def _direction(kind: str) -> str:
    return "L" if kind == "L" else "R" if kind in ("R", "EN", "AN") else kind


def _spans(kinds: list[str], of: set[str]) -> list[tuple[int, int]]:
    """Maximal ``(start, end)`` runs of ``kinds`` in ``of``."""
    spans, i = [], 0
    while i < len(kinds):
        if kinds[i] in of:
            j = i
            while j < len(kinds) and kinds[j] in of:
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return spans
