"""Regression-adjusted Monte Carlo (Witter, Liu & Musco, 2025)."""

from __future__ import annotations

from typing import Any

import numpy as np

from captum_mllm.errors import InvalidOptionError, require_real
from captum_mllm.methods.base import Game, Plan, ShapleyEstimator

SURROGATES = ("auto", "linear", "quadratic")


class RegressionAdjustedShapley(ShapleyEstimator):
    """Shapley values as a surrogate's exact values plus an unbiased Monte Carlo
    correction on the residuals.

    Coalitions are drawn with their complements, the size uniform in 0..n and
    the members uniform given the size. A ridge surrogate of the game (linear
    in the features, or with all pairwise products) is fitted on half of the
    pairs; its Shapley values are exact in closed form. The other half
    estimates the Shapley values of the residual game with the
    maximum-sample-reuse estimator, unbiased whatever the surrogate; the halves
    then swap (cross-fitting) and the two estimates are averaged. Finally the
    gap to ``f(all) - f(none)`` is spread evenly over the features, which keeps
    the estimate unbiased and makes it exactly efficient. The standard error
    is the spread of the residual correction over pairs.

    Args:
        forward_func (callable): the model or function to explain.
        surrogate (str, optional): ``"linear"``, ``"quadratic"``, or ``"auto"``:
            quadratic once each half holds twice as many coalitions as the
            quadratic surrogate has terms, linear before. Default: ``"auto"``
        alpha (float, optional): ridge penalty of the surrogate. Default: 1e-6

    Examples::

        >>> attr = RegressionAdjustedShapley(model).attribute(x, budget=10 * n_features)
    """

    def __init__(self, forward_func: Any, surrogate: str = "auto", alpha: float = 1e-6):
        super().__init__(forward_func)
        if surrogate not in SURROGATES:
            raise InvalidOptionError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        require_real("alpha", alpha, above=0, at_least=True)  # scikit-learn's own error
        self.surrogate = surrogate
        self.alpha = alpha

    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        n = game.n
        empty, full = game.ends()
        total_pairs = max(4, (plan.budget - 2) // 2)
        per_round = max(4, min(total_pairs, 4 * n))
        masks = np.zeros((0, 2, n), dtype=bool)
        values = np.zeros((0, 2, len(full)))
        rounds = 0
        while len(masks) < total_pairs:
            take = min(per_round, total_pairs - len(masks))
            drawn = _draw(n, take, plan.rng)
            masks = np.concatenate([masks, np.stack([drawn, ~drawn], 1)])
            new_values = game(np.stack([drawn, ~drawn], 1).reshape(-1, n))
            values = np.concatenate([values, new_values.reshape(take, 2, -1)])
            rounds += 1
            phi, stderr = self._combine(masks, values, empty, full)
            plan.progress.update(game, stderr)
            if plan.stop(stderr, rounds):
                break
        return self._combine(masks, values, empty, full)

    def _combine(
        self, masks: np.ndarray, values: np.ndarray, empty: np.ndarray, full: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cross-fitted estimate over pairs ``(p, 2, n)`` with values ``(p, 2, k)``."""
        n = masks.shape[-1]
        kind = self.surrogate
        if kind == "auto":  # each half holds len(masks) coalitions (pairs of two)
            kind = "quadratic" if len(masks) >= 2 * (n + n * (n - 1) // 2) else "linear"
        halves = [np.arange(len(masks)) % 2 == h for h in (0, 1)]
        estimates, variances = [], []
        for fit, use in (halves, halves[::-1]):
            model = self._fit(kind, masks[fit], values[fit].reshape(-1, values.shape[-1]))
            base = self._surrogate_shapley(kind, model, n)  # (k, n)
            units = _msr_units(masks[use], values[use] - self._predict(kind, model, masks[use]))
            # spreading the efficiency gap evenly is a projection: apply it per unit
            units = units - units.mean(axis=2, keepdims=True)
            estimates.append(base - base.mean(axis=1, keepdims=True) + units.mean(0))
            spread = units.var(axis=0, ddof=1) if len(units) > 1 else np.full_like(units[0], np.inf)
            variances.append(spread / len(units))
        phi = (estimates[0] + estimates[1]) / 2 + ((full - empty) / n)[:, None]
        return phi, np.sqrt((variances[0] + variances[1]) / 4)

    # The surrogate ------------------------------------------------------------------

    @staticmethod
    def _features(kind: str, masks: np.ndarray) -> np.ndarray:
        z = masks.reshape(-1, masks.shape[-1]).astype(float)
        if kind == "linear":
            return z
        i, j = np.triu_indices(z.shape[1], k=1)
        return np.concatenate([z, z[:, i] * z[:, j]], axis=1)

    def _fit(self, kind: str, masks: np.ndarray, values: np.ndarray) -> Any:
        from sklearn.linear_model import Ridge

        return Ridge(alpha=self.alpha).fit(self._features(kind, masks), values)

    def _predict(self, kind: str, model: Any, masks: np.ndarray) -> np.ndarray:
        shape = masks.shape[:-1]
        return model.predict(self._features(kind, masks)).reshape(*shape, -1)

    @staticmethod
    def _surrogate_shapley(kind: str, model: Any, n: int) -> np.ndarray:
        """Exact Shapley values of the surrogate: ``b_i`` (+ half of each pair term)."""
        coef = np.atleast_2d(model.coef_)  # (k, n [+ n(n-1)/2])
        phi = coef[:, :n].copy()
        if kind == "quadratic":
            i, j = np.triu_indices(n, k=1)
            for col, (a, b) in enumerate(zip(i, j, strict=True)):
                phi[:, a] += coef[:, n + col] / 2
                phi[:, b] += coef[:, n + col] / 2
        return phi


def _draw(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` coalitions: size uniform in 0..n, members uniform given the size."""
    sizes = rng.integers(0, n + 1, size=count)
    keys = rng.random((count, n))
    ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
    return ranks < sizes[:, None]


def _msr_units(masks: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """Per-pair maximum-sample-reuse estimates of the residual game's Shapley values.

    For S drawn with probability 1 / ((n + 1) C(n, |S|)), the term
    ``r(S) ((n + 1) / |S| if i in S else -(n + 1) / (n - |S|))`` has expectation
    the Shapley value of r; a pair averages its two coalitions.

    Returns:
        ndarray: ``(p, k, n)``.
    """
    n = masks.shape[-1]
    size = masks.sum(-1, keepdims=True).astype(float)  # (p, 2, 1)
    inside = (n + 1) / np.where(size > 0, size, 1.0)
    outside = -(n + 1) / np.where(size < n, n - size, 1.0)
    factor = np.where(masks, inside, outside)  # (p, 2, n)
    terms = residuals[..., :, None] * factor[..., None, :]  # (p, 2, k, n)
    return terms.mean(axis=1)
