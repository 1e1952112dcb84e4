"""The whole conversation in one matplotlib figure, turn by turn.

Text features are boxes behind their words, audio features strips on their
clip's time axis, both coloured on Captum's red-white-green scale centred on
0; fixed text is grey. Every feature's patch carries ``gid="feature-<i>"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from captum_mllm.errors import PlotError, require_int

if TYPE_CHECKING:
    from captum_mllm.result import MultimodalLLMAttributionResult

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
            x = 0.0
            for text, feature in part["text"]:
                for piece in text.split("\n"):
                    if x + len(piece) > width and x > 0:
                        x, y = 0.0, y + _LINE
                    items.append(("text", (x, y, piece, feature)))
                    x += len(piece)
            y += 1.4 * _LINE
    height = y + _LINE
    fig, ax = plt.subplots(figsize=figsize or (max(6.0, width * 0.11), max(2.0, height * 0.32)))
    for kind, args in items:
        if kind == "role":
            ax.text(0, args[0], args[1].upper(), fontsize=7, color="#777", va="top")
        elif kind == "text":
            x, ty, piece, feature = args
            if feature >= 0 and piece:
                colour = cmap(norm(float(attr[feature])))
                box = Rectangle((x, ty + 0.1), len(piece), 0.8, facecolor=colour, edgecolor="none")
                box.set_gid(f"feature-{feature}")
                ax.add_patch(box)
            colour = "black" if feature >= 0 else "#999"
            ax.text(x, ty + 0.5, piece, family="monospace", fontsize=8, va="center", color=colour)
        else:
            cy, clip = args
            _strip(ax, result, clip, cy, width, attr, norm, cmap)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.03)
    bar.ax.set_ylabel("Attribution", rotation=-90, va="bottom")
    if show:
        plt.show()
        return None
    return fig, ax


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
