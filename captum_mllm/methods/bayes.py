"""Shapley values as a Gaussian-process posterior, on coalitions chosen to pin them down."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular

from captum_mllm.errors import require_int
from captum_mllm.methods.base import Game, Plan, ShapleyEstimator
from captum_mllm.methods.kernel import LeverageKernelShap, _schedule, size_classes

#: Highest odd Walsh order the prior models (weights fall as ``theta ** ((k - 1) / 2)``;
#: theta = 0 is an additive game).
_MAX_ORDER = 15
#: Above this many coalition pairs, hand over to LeverageKernelShap (the fit is cubic in pairs).
_MAX_PAIRS = 1024
#: The priors the design is chosen under (fixed, so the design never depends on values).
_DESIGN_THETAS = (0.3, 1.0)
_THETAS = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
_TAUS = (0.0, 0.01, 0.1, 1.0, 10.0, 1e3)


class BayesianShapley(ShapleyEstimator):
    """Shapley values as the posterior mean of a Gaussian process on the game,
    with the coalitions chosen to make that posterior as tight as possible.

    In ``x = 2 z - 1`` coding (+1 present, -1 absent) a game is a sum of Walsh
    terms ``c_T prod(x_i, i in T)``; only terms of odd order have Shapley
    values (``2 c_T / |T|`` to each member). The prior gives every odd term a
    Gaussian coefficient whose variance falls with its order (order ``k`` in
    all holds ``theta ** ((k - 1) / 2)`` of order 1's, orders up to 15), plus
    a free function of the coalition's size (what depends on the size alone,
    such as a prompt's log-probability falling as words go; its Shapley
    values are equal). ``theta`` and the size term's weight are fitted by
    marginal likelihood, so a game that is nearly additive is treated as one.
    A coalition and its complement enter as one observation, the half
    difference of their values (the odd part of the game).

    The pairs are chosen greedily, each the one that most lowers the summed
    posterior variance of the Shapley values (an A-optimal design) under two
    fixed priors (``theta`` 0.3 and 1, each relative to its best candidate),
    from a random pool: every leave-one-out pair first, then coalitions of
    two and near-half ones. The priors are fixed, so the design depends on
    ``(n, budget, seed)`` only, never on the values. Estimates are put on
    ``sum = f(all) - f(none)`` exactly; the standard error is the posterior
    standard deviation (a model's, not a spread over seeds: the design varies
    little with the seed). With a budget of ``2^n`` or more than
    ``2 * 1024`` coalitions the estimate is :class:`LeverageKernelShap`'s
    (exact at ``2^n``).

    The estimator is Bayesian, not unbiased: for one fixed game it shrinks the
    higher-order part towards the prior, which is what makes it several times
    more accurate than unbiased sampling at small budgets.

    Args:
        forward_func (callable): the model or function to explain.
        pool (int, optional): random candidate pairs the design picks from
            (at least four per pair drawn). Default: 2000

    Examples::

        >>> attr, stderr = BayesianShapley(model).attribute(
        ...     x, budget=10 * n_features, return_stderr=True
        ... )
    """

    unbiased = False  # a posterior mean: shrinks the game's higher orders towards the prior
    stderr_over_seeds = False  # a posterior's; the design varies little with the seed

    def __init__(self, forward_func: Callable[..., Any], pool: int = 2000) -> None:
        super().__init__(forward_func)
        self.pool = require_int("pool", pool, 1)

    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        n = game.n
        pairs = (plan.budget - 2) // 2
        if n == 1 or pairs < 1 or plan.budget >= 2**n or pairs > _MAX_PAIRS:
            return LeverageKernelShap(self.forward_func).estimate(game, plan)
        empty, full = game.ends()
        design = _greedy_design(n, pairs, self.pool, plan.rng)
        rounds, held = 0, 0
        phi = stderr = np.zeros((len(full), n))
        for goal in _schedule(len(design), len(design), plan.target_stderr is not None):
            new = design[held:goal]
            game(np.concatenate([new, ~new]))
            held, rounds = goal, rounds + 1
            masks = np.concatenate([np.zeros((1, n), bool), design[:held]])
            half = (game.lookup(masks) - game.lookup(~masks)) / 2
            phi, stderr = _posterior(masks, half)
            phi = phi + ((full - empty) / n)[:, None]
            plan.progress.update(game, stderr)
            if plan.stop(stderr, rounds):
                break
        return phi, stderr


class _Prior:
    """Covariances of the odd part of a game under the order-decaying prior.

    Everything depends on coalitions only through counts, so it is tabulated
    by Hamming distance (between two pair representatives) and by the number
    of present players (for the Shapley values' covariance with a value).
    """

    def __init__(self, n: int, theta: float) -> None:
        orders = np.arange(1, min(n, _MAX_ORDER) + 1, 2)
        weight = theta ** ((orders - 1) / 2)  # order k's share of the variance
        # sum over |T| = k of chi_T(x) chi_T(x') / C(n, k), x and x' d apart
        self.by_distance = weight @ _krawtchouk(n)[orders]
        # Cov(phi_i, f(x)) = sum over odd T holding i of (2 / |T|) Var(c_T) chi_T(x):
        # x_i times e_{k-1} of the other n - 1, for x_i = +1 and -1, by how many are present
        others = weight @ _krawtchouk(n - 1)[orders - 1] * 2 / n  # by the others' minus count
        present = np.arange(n + 1)
        self.present = np.where(present > 0, others[np.clip(n - present, 0, n - 1)], 0.0)
        self.absent = np.where(present < n, -others[np.clip(n - present - 1, 0, n - 1)], 0.0)
        # Var(phi_i - mean phi), the prior's: sum of (2 / k)^2 Var(c_T) over pairs' differences
        self.phi_var = float(weight @ (4 * (n - orders) / (orders * n**2)))

    def gram(self, distance: np.ndarray) -> np.ndarray:
        return self.by_distance[distance]

    def cross(self, masks: np.ndarray) -> np.ndarray:
        """``(p, n)``: covariance of each centred Shapley value with each pair's value."""
        plus = masks.sum(1)
        c = np.where(masks, self.present[plus][:, None], self.absent[plus][:, None])
        return c - c.mean(1, keepdims=True)


@functools.lru_cache(maxsize=16)
def _krawtchouk(total: int) -> np.ndarray:
    """``(K + 1, total + 1)``: the k-th elementary symmetric polynomial of
    ``total - m`` ones and ``m`` minus ones, over ``C(total, k)``, for k up to
    the prior's top order. Exact integers (the alternating sums cancel), the
    coefficients of ``(1 + t)^(total - m) (1 - t)^m``, stepped in m."""
    top = min(total, _MAX_ORDER)
    coef = [math.comb(total, k) for k in range(top + 1)]
    out = np.zeros((top + 1, total + 1))
    for m in range(total + 1):
        out[:, m] = [c / math.comb(total, k) for k, c in enumerate(coef)]
        divided: list[int] = []  # over (1 + t), then times (1 - t): one more minus one
        for k, c in enumerate(coef):
            divided.append(c - (divided[k - 1] if k else 0))
        coef = [d - (divided[k - 1] if k else 0) for k, d in enumerate(divided)]
    return out


def _distance(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """Hamming distances between pair representatives."""
    a, b = masks_a.astype(np.int64), masks_b.astype(np.int64)
    return a @ (1 - b).T + (1 - a) @ b.T


def _greedy_design(n: int, pairs: int, pool: int, rng: np.random.Generator) -> np.ndarray:
    """``(pairs, n)`` pair representatives (size <= n / 2), in the order chosen.

    Each step takes the candidate that most lowers the posterior variance of
    the Shapley values under each design prior, relative to the best
    candidate's reduction under that prior, summed over the priors: one prior
    alone (a near-additive game) leaves small coalitions out, which a game
    with strong interactions among few words punishes."""
    cand = _candidates(n, max(pool, 4 * pairs), rng)
    designs = [_Design(_Prior(n, theta), cand, pairs) for theta in _DESIGN_THETAS]
    alive = np.ones(len(cand), bool)
    chosen = []
    first = int(np.flatnonzero(~cand.any(1))[0])  # (empty, full) is always evaluated
    for step in range(min(pairs, len(cand) - 1) + 1):
        if step == 0:
            j = first
        else:
            score = np.zeros(len(cand))
            for design in designs:
                gain = design.gain()
                score += gain / max(gain[alive].max(), 1e-300)
            j = int(np.argmax(np.where(alive, score, -np.inf)))
            chosen.append(j)
        alive[j] = False
        distance = _distance(cand, cand[j : j + 1])[:, 0]
        for design in designs:
            design.condition(j, distance, step)
    return cand[chosen]


class _Design:
    """The posterior over the candidates under one prior, conditioned step by
    step (rank-one updates of a Cholesky factor)."""

    def __init__(self, prior: _Prior, candidates: np.ndarray, pairs: int) -> None:
        self.prior = prior
        self.r = prior.cross(candidates)  # residual covariance of phi with each candidate
        self.var = np.full(len(candidates), prior.by_distance[0])
        self.v = np.zeros((len(candidates), pairs + 1))  # columns of the Cholesky factor so far

    def gain(self) -> np.ndarray:
        """Summed posterior variance of phi that evaluating each candidate would remove."""
        return (self.r**2).sum(1) / np.maximum(self.var, 1e-300)

    def condition(self, j: int, distance: np.ndarray, step: int) -> None:
        k = self.prior.by_distance[distance] - self.v[:, :step] @ self.v[j, :step]
        vj = max(self.var[j], 1e-300)
        self.r -= np.outer(k / vj, self.r[j])
        self.var -= k**2 / vj
        self.v[:, step] = k / math.sqrt(vj)


def _candidates(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct pair representatives: the empty set, every singleton, and
    random coalitions of sizes 1..n/2 (all of them when there are few)."""
    half = n // 2
    if 2 ** (n - 1) <= count + n + 1:  # few enough: every pair
        codes = np.arange(2**n)
        masks = ((codes[:, None] >> np.arange(n)) & 1).astype(bool)
    else:
        sizes = rng.integers(1, half + 1, size=count)
        ranks = np.argsort(rng.random((count, n)), axis=1).argsort(axis=1)
        masks = np.concatenate(
            [np.zeros((1, n), bool), np.eye(n, dtype=bool), ranks < sizes[:, None]]
        )
    sizes = masks.sum(1)
    masks = masks[2 * sizes <= n]
    # a pair is represented by its smaller side; at n / 2, by the side holding player 0
    flip = (2 * masks.sum(1) == n) & ~masks[:, 0]
    masks[flip] = ~masks[flip]
    return np.unique(masks, axis=0)


def _posterior(masks: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean (centred) and standard deviation ``(k, n)`` of the Shapley
    values given the pairs' half differences ``(p, k)``; hyperparameters by
    maximum marginal likelihood over a grid, shared by the k output columns."""
    p, n = masks.shape
    classes = size_classes(masks)
    same_size = classes @ classes.T  # the free size function's covariance
    best = None
    distance = _distance(masks, masks)
    # with no more pairs than features an additive game (theta = 0) fits any data
    # exactly, with zero error bars: it needs more pairs to be told apart
    for theta in _THETAS if p > n + 1 else _THETAS[1:]:
        prior = _Prior(n, theta)
        base = prior.gram(distance)
        for tau in _TAUS:
            gram = base + tau * same_size * np.trace(base) / max(np.trace(same_size), 1.0)
            gram += 1e-9 * np.trace(gram) / p * np.eye(p)
            try:
                chol = np.linalg.cholesky(gram)
            except np.linalg.LinAlgError:  # numerically singular: not a candidate
                continue
            white = solve_triangular(chol, half, lower=True)
            scale = (white**2).sum(0) / p  # per column, at its maximum likelihood
            loglik = -0.5 * p * np.log(np.maximum(scale, 1e-300)).sum()
            loglik -= half.shape[1] * np.log(np.diag(chol)).sum()
            if best is None or loglik > best[0]:
                best = (loglik, prior, chol, white, scale)
    _, prior, chol, white, scale = best  # type: ignore[misc]
    cross = solve_triangular(chol, prior.cross(masks), lower=True)  # (p, n)
    phi = (cross.T @ white).T
    var = np.maximum(prior.phi_var - (cross**2).sum(0), 0.0)
    return phi, np.sqrt(scale[:, None] * var[None, :])
