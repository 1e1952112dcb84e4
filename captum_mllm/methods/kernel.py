"""Kernel SHAP with leverage-score sampling (Musco & Witter, ICLR 2025)."""

from __future__ import annotations

import math

import numpy as np

from captum_mllm.methods.base import Game, Plan, ShapleyEstimator

_BOOTSTRAPS = 40


class LeverageKernelShap(ShapleyEstimator):
    """Kernel SHAP with paired leverage-score sampling without replacement and
    the efficiency constraint solved exactly.

    The Kernel SHAP regression's leverage scores are equal across coalition
    sizes (Musco & Witter, "Provably accurate Shapley value estimation via
    leverage score sampling", ICLR 2025), so coalitions are drawn stratified by
    size, the same number from every size, each with its complement, without
    replacement; each stratum is reweighted to its full size (Horvitz-Thompson).
    The weighted least squares is solved on the subspace where the values sum
    to ``f(all) - f(none)``, so estimates are exactly efficient. With a budget
    of ``2^n`` every coalition is used and the result is exact. The estimator
    is consistent (not unbiased); the standard error is a bootstrap over pairs.

    Args:
        forward_func (callable): the model or function to explain.

    Examples::

        >>> attr = LeverageKernelShap(model).attribute(x, budget=20 * n_features)
    """

    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        n = game.n
        empty, full = game.ends()
        if n == 1:
            return (full - empty)[:, None], np.zeros((len(full), 1))
        strata = _Strata(n, plan.rng)
        interior = max(2, plan.budget - 2)
        rounds = 0
        phi = stderr = np.zeros((len(full), n))
        # Grow the sample in rounds (doubling) until the budget or the target stderr.
        for goal in _schedule(interior, strata.total):
            masks = strata.grow(goal)
            if len(masks):
                game(masks)
            rounds += 1
            phi, stderr = strata.solve(game, empty, full)
            plan.progress.update(game, stderr)
            if plan.stop(stderr, rounds) or strata.count >= strata.total:
                break
        return phi, stderr


def _schedule(interior: int, total: int) -> list[int]:
    """Sample sizes of successive rounds: doubling up to the budget (or every coalition)."""
    cap = min(interior, total)
    goals, goal = [], min(cap, max(4, cap // 8))
    while goal < cap:
        goals.append(goal)
        goal *= 2
    return [*goals, cap]


class _Strata:
    """Coalitions sampled by size (1..n-1), each with its complement, without replacement."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.size_of = {s: math.comb(n, s) for s in range(1, n)}
        self.total = sum(self.size_of.values())
        self.held: dict[int, set[bytes]] = {s: set() for s in range(1, n)}
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []  # (mask, complement)

    @property
    def count(self) -> int:
        return sum(len(h) for h in self.held.values())

    def grow(self, goal: int) -> np.ndarray:
        """Draw new pairs so that about ``goal`` coalitions are held, spread evenly
        over sizes (a size class that is all drawn gives its share to the others)."""
        quota = _allocate([self.size_of[s] for s in range(1, self.n)], goal)
        new = []
        for s in range(1, self.n // 2 + 1):  # size s comes with its complement's size n - s
            want = max(quota[s - 1], quota[self.n - s - 1])
            held = self.held[s]
            if want >= self.size_of[s] and len(held) < self.size_of[s]:
                candidates = _all_of_size(self.n, s)  # the whole class: enumerate it
            else:
                candidates = _random_of_size(self.n, s, 3 * (want - len(held)) + 8, self.rng)
            for mask in candidates:
                if len(held) >= want or self.count + 2 > goal:  # a pair never passes the budget
                    break
                if np.packbits(mask).tobytes() in held:
                    continue
                for m in (mask, ~mask):
                    self.held[int(m.sum())].add(np.packbits(m).tobytes())
                self.pairs.append((mask, ~mask))
                new += [mask, ~mask]
        return np.array(new, dtype=bool).reshape(-1, self.n)

    def solve(
        self, game: Game, empty: np.ndarray, full: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The constrained weighted least squares, and its bootstrap spread over pairs."""
        masks = np.array([m for pair in self.pairs for m in pair], dtype=bool)
        sizes = masks.sum(1)
        # Kernel SHAP weight of a size class times its size over the number drawn from it.
        drawn = np.array([len(self.held[int(s)]) for s in sizes])
        weights = 1.0 / (sizes * (self.n - sizes) * drawn)
        z, y = masks.astype(float), game.lookup(masks)
        phi = _constrained_lstsq(z, y, weights, empty, full)
        strata: dict[int, list[int]] = {}
        for p, (mask, _) in enumerate(self.pairs):
            s = int(mask.sum())
            if len(self.held[s]) < self.size_of[s]:  # a class drawn whole has no sampling error
                strata.setdefault(min(s, self.n - s), []).append(p)
        if not strata:
            return phi, np.zeros_like(phi)
        boots = []
        for _ in range(_BOOTSTRAPS):
            pick = np.arange(len(self.pairs))
            for members in strata.values():
                pick[members] = self.rng.choice(members, size=len(members), replace=True)
            rows = np.stack([2 * pick, 2 * pick + 1], axis=1).reshape(-1)
            boots.append(_constrained_lstsq(z[rows], y[rows], weights[rows], empty, full))
        return phi, np.std(np.stack(boots), axis=0, ddof=1)


def _constrained_lstsq(
    z: np.ndarray, y: np.ndarray, w: np.ndarray, empty: np.ndarray, full: np.ndarray
) -> np.ndarray:
    """argmin sum_r w_r (z_r . phi - (v_r - v(empty)))^2  s.t.  sum(phi) = v(full) - v(empty).

    Writing phi = P x + delta / n with P the projection onto sum-zero vectors
    makes the constraint hold exactly; x solves an ordinary least squares.
    """
    n = z.shape[1]
    delta = full - empty  # (k,)
    target = (y - empty) - np.outer(z.sum(1) / n, delta)  # remove the constrained part
    project = np.eye(n) - 1.0 / n
    a = (z @ project) * np.sqrt(w)[:, None]
    b = target * np.sqrt(w)[:, None]
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    return (project @ x + delta[None, :] / n).T  # (k, n)


def _allocate(capacity: list[int], goal: int) -> list[int]:
    """Spread ``goal`` samples evenly over classes, none above its capacity."""
    quota = [0] * len(capacity)
    left, open_ = goal, list(range(len(capacity)))
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for c in list(open_):
            add = min(share, capacity[c] - quota[c], left)
            quota[c] += add
            left -= add
            if quota[c] >= capacity[c]:
                open_.remove(c)
            if left <= 0:
                break
    return quota


def _all_of_size(n: int, s: int) -> list[np.ndarray]:
    from itertools import combinations

    out = []
    for members in combinations(range(n), s):
        mask = np.zeros(n, dtype=bool)
        mask[list(members)] = True
        out.append(mask)
    return out


def _random_of_size(n: int, s: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(count):
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=s, replace=False)] = True
        out.append(mask)
    return out
