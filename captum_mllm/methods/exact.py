"""Exact Shapley values from all 2^n coalitions, each evaluated once."""

from __future__ import annotations

from typing import Any

import numpy as np

from captum_mllm.errors import InvalidOptionError, require_int
from captum_mllm.methods.base import (
    Game,
    Plan,
    ShapleyEstimator,
    evaluate_in_chunks,
    shapley_weight,
)


class ExactShapleyValues(ShapleyEstimator):
    """Exact Shapley values: every one of the 2^n coalitions evaluated once
    (batched by ``perturbations_per_eval``), combined with the Shapley weights.

    Captum's ``ShapleyValues`` walks all n! orders (n * n! forward calls); this
    needs 2^n. Standard errors are zero.

    Args:
        forward_func (callable): the model or function to explain.
        max_features (int, optional): refuse more features than this (2^20 is
            about a million coalitions). Default: 20

    Examples::

        >>> attr = ExactShapleyValues(model).attribute(x, feature_mask=mask,
        ...                                            perturbations_per_eval=256)
    """

    exact = True

    def __init__(self, forward_func: Any, max_features: int = 20) -> None:
        super().__init__(forward_func)
        self.max_features = require_int("max_features", max_features, 1)

    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        n = game.n
        if n > self.max_features:
            raise InvalidOptionError(
                f"exact Shapley values of {n} features need 2^{n} coalitions (limit "
                f"max_features={self.max_features}); use LeverageKernelShap or "
                "RegressionAdjustedShapley with a budget, or HierarchicalShapley"
            )
        index = np.arange(2**n, dtype=np.int64)
        bits = (index[:, None] >> np.arange(n)) & 1  # (2^n, n): bit i = feature i present
        values = evaluate_in_chunks(game, bits.astype(bool), plan.progress)  # (2^n, k)
        size = bits.sum(1)
        weights = np.array([shapley_weight(n, s) for s in range(n)] + [0.0])
        phi = np.zeros((values.shape[1], n))
        for i in range(n):
            without = index[bits[:, i] == 0]
            gain = values[without | (1 << i)] - values[without]  # (2^(n-1), k)
            phi[:, i] = weights[size[without]] @ gain
        return phi, np.zeros_like(phi)
