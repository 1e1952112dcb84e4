"""Captum's token heatmap, without writing a value into every cell first."""

from __future__ import annotations

from typing import Any

import numpy as np


def token_heatmap(result: Any) -> tuple[Any, Any]:
    """The figure of Captum's ``LLMAttributionResult.plot_token_attr``: the same
    colours, scale, colour bar and labels, but no value written in its cells:
    :func:`~captum_mllm.viz.labels.fit_heatmap` writes them where they fit.

    Captum writes a text into every cell, which took 27 s for 100 output tokens
    by 600 features and over 5 minutes for 300 by 3,000, only for the texts to be
    dropped as too small to read.

    Args:
        result (LLMAttributionResult): a result with ``token_attr``.

    Returns:
        tuple[Figure, Axes]: the figure and its heatmap axes.
    """
    import matplotlib.pyplot as plt

    data = result.token_attr.detach().cpu().float().numpy()
    bound = float(np.abs(data).max()) if data.size else 0.0
    fig, ax = plt.subplots()
    ax.grid(False)
    fig.set_size_inches(max(data.shape[1] * 1.3, 6.4), max(data.shape[0] / 2.5, 4.8))
    image = ax.imshow(
        data, vmax=bound, vmin=-bound, cmap=result._get_plot_color_map(), aspect="auto"
    )
    fig.set_facecolor("white")
    fig.colorbar(image, ax=ax).ax.set_ylabel("Token Attribution", rotation=-90, va="bottom")
    ax.set_xticks(np.arange(data.shape[1]), labels=[repr(t)[1:-1] for t in result.input_tokens])
    ax.set_yticks(np.arange(data.shape[0]), labels=[repr(t)[1:-1] for t in result.output_tokens])
    ax.tick_params(top=True, bottom=False, labeltop=True, labelbottom=False)
    plt.setp(ax.get_xticklabels(), rotation=-30, ha="right", rotation_mode="anchor")
    return fig, ax


def cell_values(ax: Any, size: float) -> list[Any]:
    """Write each cell's value into the heatmap of ``ax`` at ``size`` points,
    as Captum writes them (four decimals; black on light cells, white on dark)."""
    image = ax.images[0]
    values = np.asarray(image.get_array())
    shade = image.norm(values)
    light = (shade > 0.2) & (shade < 0.8)
    return [
        ax.text(j, i, f"{value:.4f}", horizontalalignment="center",
                verticalalignment="center", color="black" if light[i, j] else "white",
                fontsize=size)
        for (i, j), value in np.ndenumerate(values)
    ]  # fmt: skip
