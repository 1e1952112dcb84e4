"""Rank agreement between explanations of the same features (:func:`compare`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from captum_mllm.errors import InvalidOptionError, warn_caller
from captum_mllm.result import MultimodalLLMAttributionResult


def compare(
    *results: MultimodalLLMAttributionResult,
    names: list[str] | None = None,
    target_token_pos: int | None = None,
    show: bool = False,
) -> tuple[pd.DataFrame, Any]:
    """Rank agreement between explanations of the same features.

    Args:
        *results: two or more results over the same features (or one list of them).
        names (list of str, optional): a name per result. Default: each result's method
        target_token_pos (int, optional): compare that output token's row; None
            the sequence attributions. Default: None
        show (bool, optional): show the plot instead of returning it. Default: False

    Returns:
        tuple: ``(Spearman rank correlation matrix as a DataFrame, (fig, ax) or None)``.

    Examples::

        >>> table, (fig, ax) = compare(shapley_res, ig_res, attention_res)
    """
    import matplotlib.pyplot as plt

    if len(results) == 1 and isinstance(results[0], list | tuple):  # compare([a, b])
        results = tuple(results[0])
    if len(results) < 2:
        raise InvalidOptionError("compare needs at least two results")
    first = results[0]
    for r in results[1:]:  # equal counts are not enough: rows must pair up feature by feature
        if list(r.input_tokens) != list(first.input_tokens):
            raise InvalidOptionError(
                f"the results explain different features ({first.input_tokens} and "
                f"{r.input_tokens}); compare explanations of the same ChatInput"
            )
        if target_token_pos is not None and list(r.output_tokens) != list(first.output_tokens):
            raise InvalidOptionError(
                "the results explain different responses; compare their sequence "
                "attributions (target_token_pos=None) or explain the same target"
            )
    if names is None:  # two runs of one method: "Saliency (1)", "Saliency (2)"
        methods = [str(r.provenance.get("method", f"result {i}")) for i, r in enumerate(results)]
        names = [m if methods.count(m) == 1 else f"{m} ({methods[:i].count(m) + 1})"
                 for i, m in enumerate(methods)]  # fmt: skip
    if len(names) != len(results):
        raise InvalidOptionError(f"{len(names)} names for {len(results)} results")
    if len(set(names)) != len(names):  # the table's rows could not be told apart
        raise InvalidOptionError(f"names must differ, got {names}")
    rows = np.stack([r._row(target_token_pos).numpy() for r in results])
    k = len(results)
    flat = [bool(np.ptp(row) == 0) for row in rows]  # no ranking: undefined, as in pandas
    if any(flat):
        warn_caller(
            f"{[n for n, f in zip(names, flat, strict=True) if f]} give every feature the "
            "same attribution: their rank correlations are undefined (NaN)"
        )
    matrix = np.ones((k, k))
    for i in range(k):
        for j in range(i, k):
            rho = np.nan if flat[i] or flat[j] else spearmanr(rows[i], rows[j]).statistic
            matrix[i, j] = matrix[j, i] = 1.0 if i == j and not flat[i] else rho
    table = pd.DataFrame(matrix, index=names, columns=names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.2 * k + 1))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="Spearman rank correlation")
    ax.set_title("Agreement between explanations")
    if show:
        plt.show()
        return table, None
    return table, (fig, ax)
