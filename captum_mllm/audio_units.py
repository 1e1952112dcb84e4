"""Audio features from ``audio_unit``: frames, windows of seconds, whole clips,
or explicit spans (aligned words)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from captum_mllm.errors import InvalidOptionError, InvalidSpanError

#: Audio units found by aligning a transcript to its clip.
ALIGNED_UNITS = ("word", "sentence")

# (positions, label, time span)
Found = tuple[tuple[int, ...], str, tuple[float, float] | None]


def is_span_list(unit: Any) -> bool:
    return isinstance(unit, Sequence) and not isinstance(unit, str)


def per_clip_spans(unit: Any) -> Sequence[Any] | None:
    """``audio_unit`` when it is one list of spans per clip (``[[(0, 0.5), ...], [...]]``),
    else None (one list of spans holds numbers, not spans)."""
    nested = (
        is_span_list(unit)
        and len(unit) > 0
        and all(is_span_list(spans) and all(is_span_list(s) for s in spans) for spans in unit)
    )
    return unit if nested else None


def audio_group(unit: Any, t0: float, t1: float, position: int, end: float) -> int:
    """Feature key of an audio position under a ``"frame"``, ``"turn"`` or
    seconds ``audio_unit``.

    A position belongs to the window holding its midpoint; the last position
    may reach past the clip's end (the encoder pads), so its midpoint is kept
    inside the clip.
    """
    if unit == "frame":
        return position
    if unit == "turn":
        return 0
    if isinstance(unit, int | float) and not isinstance(unit, bool):
        if not math.isfinite(unit) or unit <= 0:
            raise InvalidOptionError(
                f"an audio window must be a positive, finite number of seconds, got {unit!r}"
            )
        return int(min((t0 + t1) / 2, end - 1e-6) // unit)
    raise InvalidOptionError(
        f"audio_unit must be 'frame', 'turn', 'word', seconds or a list of spans, got {unit!r}"
    )


def span_features(
    spans: Sequence[Sequence[Any]],
    positions: list[int],
    times: list[list[float]],
    end: float,
) -> list[Found]:
    """Features of explicit ``(start_s, end_s[, label])`` spans of one clip.

    A position belongs to the span holding its midpoint; positions outside
    every span stay fixed; overlapping spans raise. A span holding no
    midpoint (shorter than a position) merges with the following span, or the
    preceding one at the clip's end.
    """
    checked = []
    for span in spans:
        try:
            start, stop = float(span[0]), float(span[1])
            if len(span) not in (2, 3):
                raise ValueError
        except (TypeError, ValueError, IndexError):
            raise InvalidSpanError(
                f"an audio span is (start_s, end_s[, label]), got {span!r}"
            ) from None
        if not 0 <= start < stop or start >= end:
            raise InvalidSpanError(
                f"audio span {tuple(span)!r} is reversed, empty or outside its {end:.2f} s "
                "clip; give 0 <= start < end inside the clip"
            )
        label = str(span[2]) if len(span) == 3 else f"audio[{start:.2f}-{min(stop, end):.2f}s]"
        checked.append((start, min(stop, end), label))
    checked.sort()
    for (a0, b0, first), (a1, _, second) in zip(checked, checked[1:], strict=False):
        if a1 < b0:  # a position would have to belong to two features
            raise InvalidSpanError(
                f"audio spans {first!r} ({a0:g}-{b0:g} s) and {second!r} (from {a1:g} s) "
                "overlap; give spans that do not (a span may end where the next begins)"
            )
    members: list[list[int]] = [[] for _ in checked]
    for p, (t0, t1) in zip(positions, times, strict=True):
        middle = min((t0 + t1) / 2, end - 1e-6)
        i = next((i for i, (a, b, _) in enumerate(checked) if a <= middle < b), None)
        if i is not None:
            members[i].append(p)
    held = [i for i, m in enumerate(members) if m]
    if not held:
        raise InvalidSpanError(
            f"no audio span holds an 80 ms model position ({spans!r}); use longer spans"
        )
    owner = [
        i if members[i] else next((j for j in held if j > i), held[-1]) for i in range(len(checked))
    ]
    found: list[Found] = []
    for j in held:
        merged = [checked[i] for i in range(len(checked)) if owner[i] == j]
        label = " ".join(lab for _, _, lab in merged)
        time = (merged[0][0], max(b for _, b, _ in merged))
        found.append((tuple(members[j]), label, time))
    return found
