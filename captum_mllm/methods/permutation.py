"""Permutation sampling with antithetic (reversed) pairs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from captum_mllm.methods.base import Game, Plan, ShapleyEstimator, mean_and_stderr


class PairedPermutationSampling(ShapleyEstimator):
    """Shapley values by permutation sampling, each random order paired with
    its reverse (antithetic sampling).

    A pair of orders costs ``2 (n - 1)`` coalitions (the empty and the full
    coalition are shared by all orders); a feature's estimate is its mean
    marginal contribution. Estimates are unbiased and exactly efficient; the
    standard error is the spread over pairs.

    Args:
        forward_func (callable): the model or function to explain.

    Examples::

        >>> attr, se = PairedPermutationSampling(model).attribute(
        ...     x, budget=400, target_stderr=0.01, return_stderr=True)
    """

    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        return paired_order_sampling(game, plan, lambda rng: rng.permutation(game.n))


def paired_order_sampling(
    game: Game, plan: Plan, draw: Callable[[np.random.Generator], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean marginal contributions over random orders (``draw``), each paired
    with its reverse, in rounds until the budget or the target standard error."""
    n = game.n
    empty, full = game.ends()
    cost = max(1, 2 * (n - 1))
    pairs = max(1, (plan.budget - 2) // cost)
    per_round = max(1, min(pairs, 8))
    units: list[np.ndarray] = []
    rounds = 0
    while len(units) < pairs:
        take = min(per_round, pairs - len(units))
        orders = np.stack([draw(plan.rng) for _ in range(take)])
        orders = np.concatenate([orders, orders[:, ::-1]])  # each with its reverse
        phi = _marginals(game, orders, empty, full)  # (2 * take, k, n)
        units += list((phi[:take] + phi[take:]) / 2)
        rounds += 1
        _, stderr = mean_and_stderr(np.stack(units))
        plan.progress.update(game, stderr)
        if plan.stop(stderr, rounds):
            break
    return mean_and_stderr(np.stack(units))


def _marginals(game: Game, orders: np.ndarray, empty: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Marginal contributions along each order: ``(p, n)`` orders -> ``(p, k, n)``."""
    p, n = orders.shape
    ranks = np.argsort(orders, axis=1)  # position of each feature in its order
    # prefix j of an order holds the features ranked below j: (p, n - 1, n) interior masks
    masks = ranks[:, None, :] < np.arange(1, n)[None, :, None]
    k = empty.shape[-1]
    inner = game(masks.reshape(-1, n)).reshape(p, n - 1, k)
    chain = np.concatenate(
        [np.broadcast_to(empty, (p, 1, k)), inner, np.broadcast_to(full, (p, 1, k))], axis=1
    )  # (p, n + 1, k): values of prefixes of length 0..n
    gains = chain[:, 1:] - chain[:, :-1]  # (p, n, k): gain of the j-th feature of the order
    phi = np.zeros((p, k, n))
    rows = np.arange(p)[:, None]
    phi[rows, :, orders] = gains  # feature orders[r, j] gets gains[r, j]
    return phi
