"""Kernel SHAP with leverage-score sampling (Musco & Witter, ICLR 2025)."""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from scipy.sparse import csr_array

from captum_mllm.methods.base import Game, Plan, ShapleyEstimator

_BOOTSTRAPS = 40
#: Ridge penalty (times the mean diagonal) with no pairs, fading to 0 at 2n pairs (4n coalitions).
_SHRINK = 0.1


class LeverageKernelShap(ShapleyEstimator):
    """Kernel SHAP with paired leverage-score sampling without replacement and
    the efficiency constraint solved exactly.

    The Kernel SHAP regression's leverage scores are equal across coalition
    sizes (Musco & Witter, "Provably accurate Shapley value estimation via
    leverage score sampling", ICLR 2025), so coalitions are drawn stratified by
    size, the same number from every size, each with its complement, without
    replacement; each stratum is reweighted to its full size (Horvitz-Thompson).
    A pair enters the regression as one row, the half-difference of its two
    values (only that odd part of a game has Shapley values), beside a free
    function of the coalition's size: that term takes up what depends on the
    size alone (a prompt's log-probability falls as words go), which has equal
    Shapley values for all features and would otherwise leak into the estimate
    from a finite sample. The fit is then put on ``sum = f(all) - f(none)``,
    so estimates are exactly efficient. Below a budget of ``4 n`` the fit is
    shrunk towards the equal split (a ridge penalty that fades to zero at
    ``4 n``), where the plain fit, with fewer pairs than features, would
    interpolate noise. With a budget of ``2^n`` every coalition is used and
    the result is exact. The estimator is consistent (not unbiased); the
    standard error is a bootstrap over pairs.

    Args:
        forward_func (callable): the model or function to explain.

    Examples::

        >>> attr = LeverageKernelShap(model).attribute(x, budget=20 * n_features)
    """

    unbiased = False  # a least-squares fit on a random sample: biased by O(1 / budget)

    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        n = game.n
        empty, full = game.ends()
        if n == 1:
            return (full - empty)[:, None], np.zeros((len(full), 1))
        strata = _Strata(n, plan.rng)
        interior = max(2, plan.budget - 2)
        rounds = 0
        phi = stderr = np.zeros((len(full), n))
        # Grow the sample in rounds (doubling) until the budget or the target
        # stderr; with no target, in one round (one batch plan, fewer forwards).
        for goal in _schedule(interior, strata.total, plan.target_stderr is not None):
            masks = strata.grow(goal)
            if len(masks):
                game(masks)
            rounds += 1
            phi, stderr = strata.solve(game, empty, full)
            plan.progress.update(game, stderr)
            if plan.stop(stderr, rounds) or strata.count >= strata.total:
                break
        return phi, stderr


def _schedule(interior: int, total: int, stepwise: bool = True) -> list[int]:
    """Sample sizes of successive rounds: doubling up to the budget (or every
    coalition), or the whole budget at once unless ``stepwise``."""
    cap = min(interior, total)
    if not stepwise:
        return [cap]
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
        return 2 * len(self.pairs)  # no two pairs share a coalition (grow skips held ones)

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
        """The weighted least squares on pair differences, and its bootstrap spread."""
        masks = np.array([mask for mask, _ in self.pairs], dtype=bool)  # |mask| <= n / 2
        sizes = masks.sum(1)
        half = (game.lookup(masks) - game.lookup(~masks)) / 2  # (p, k)
        # A pair stands for its size class (sizes s and n - s): the classes' Kernel
        # SHAP weights 1 / (s (n - s)) each, shared by the pairs drawn from it.
        drawn = np.array([len(self.held[int(s)]) for s in sizes])
        weights = 1.0 / (sizes * (self.n - sizes) * drawn)
        strata: dict[int, list[int]] = {}
        for p, s in enumerate(sizes):  # a class drawn whole has no sampling error
            if len(self.held[int(s)]) < self.size_of[int(s)]:
                strata.setdefault(int(s), []).append(p)
        shrink = _SHRINK * max(0.0, 1 - len(masks) / (2 * self.n)) if strata else 0.0
        phi = _pair_lstsq(masks, half, weights, empty, full, shrink)
        if not strata:
            return phi, np.zeros_like(phi)
        groups = _collapsed(strata)
        if groups is None:  # one sampled pair: no spread to resample
            return phi, np.full_like(phi, np.inf)
        boots = []
        for _ in range(_BOOTSTRAPS):
            pick = np.arange(len(self.pairs))
            for members in groups:
                pick[members] = self.rng.choice(members, size=len(members), replace=True)
            boots.append(_pair_lstsq(masks[pick], half[pick], weights[pick], empty, full, shrink))
        return phi, np.std(np.stack(boots), axis=0, ddof=1)


def _collapsed(strata: dict[int, list[int]]) -> list[list[int]] | None:
    """The strata the bootstrap resamples within, each of two pairs or more: a
    stratum of one pair (resampled, it never varies: a standard error of 0)
    joins its neighbour by size, as in the collapsed-strata variance
    estimator. None when only one pair was sampled."""
    groups: list[list[int]] = []
    for size in sorted(strata):
        if groups and len(groups[-1]) < 2:
            groups[-1] += strata[size]
        else:
            groups.append(list(strata[size]))
    if len(groups[-1]) < 2 and len(groups) > 1:
        last = groups.pop()
        groups[-1] += last
    return groups if len(groups[0]) >= 2 else None


def _pair_lstsq(
    masks: np.ndarray,
    half: np.ndarray,
    w: np.ndarray,
    empty: np.ndarray,
    full: np.ndarray,
    shrink: float = 0.0,
) -> np.ndarray:
    """Kernel SHAP's weighted least squares on the odd part of the game, made efficient.

    With ``x = 2 z - 1`` (+1 present, -1 absent), a coalition and its complement
    differ only in the game's odd part, and only that part has Shapley values
    (a game with ``v(S) = v(N \\ S)`` has none). So each pair gives one row,
    ``(v(S) - v(N \\ S)) / 2 ~ h(|S|) + sum_i b_i x_i``, where ``h``, a free
    function of the size, takes up the symmetric part of the game (such as the
    prompt getting shorter), whose Shapley values are all equal. With too few
    pairs to spare one unknown a size class, ``h`` is only linear in the size,
    which the ``x_i`` already span. The Shapley values of the fit, ``2 b``, are
    then moved onto ``sum(phi) = f(all) - f(none)``: exactly efficient, and,
    over every coalition, exactly Shapley's (the fit's off-sum part is).

    ``shrink`` > 0 adds a ridge penalty on the ``b_i`` of ``shrink`` times the
    mean diagonal of the normal equations, pulling the estimate towards the
    equal split: with fewer pairs than features the plain fit interpolates
    the game's noise.
    """
    n = masks.shape[1]
    x = 2.0 * masks - 1.0
    classes = size_classes(masks)
    if len(masks) < n + 2 * classes.shape[1]:
        classes = classes[:, :0]
    # The ridge penalty's scale, the mean diagonal of the normal equations: each
    # of x's columns holds the sum of w, the classes' together that over theirs.
    penalty = shrink * w @ (n + classes.sum(1)) / (n + classes.shape[1])
    root = np.sqrt(w)[:, None]
    try:  # the normal equations: a fraction of a least-squares solver's time at large n
        coef = _normal_equations(classes, x * root, half * root, w, penalty)
    except LinAlgError:  # singular: the minimum-norm fit
        a, b = np.concatenate([classes, x], axis=1) * root, half * root
        if penalty > 0:
            gram = a.T @ a
            gram[-n:, -n:] += penalty * np.eye(n)
            coef = np.linalg.lstsq(gram, a.T @ b, rcond=None)[0][-n:]
        else:
            coef = np.linalg.lstsq(a, b, rcond=None)[0][-n:]
    phi = 2 * coef.T  # (k, n)
    return phi - phi.mean(axis=1, keepdims=True) + ((full - empty) / n)[:, None]


def _normal_equations(
    classes: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray, penalty: float
) -> np.ndarray:
    """The fit's ``b_i`` from the normal equations of ``a`` (x, weighted) and
    ``b``. The size ``classes``' free values are fitted first, by subtracting
    each class's weighted mean from x (rows of no class, the pairs of size
    n / 2, stay as they are). Then x's sum, linear in the size, is 0 in every
    row and so is the fit's, as centred after. Raises LinAlgError when the
    equations are (near) singular."""
    if classes.shape[1]:
        scaled = csr_array(classes * np.sqrt(w)[:, None])  # p * n work, not p * n * classes
        a = a - scaled @ ((scaled.T @ a) / (classes.T @ w)[:, None])
    gram = a.T @ a
    gram[np.diag_indices(len(gram))] += penalty
    if classes.shape[1]:
        gram += w.sum()  # a penalty on x's sum, which no fit determines
    chol, lower = cho_factor(gram)  # raises LinAlgError unless positive definite
    pivots = np.abs(np.diag(chol))
    if pivots.min() < 1e-6 * pivots.max():  # near singular: features the pairs confound
        raise LinAlgError("the normal equations are near singular")
    return cho_solve((chol, lower), a.T @ b)


def size_classes(masks: np.ndarray) -> np.ndarray:
    """``(p, c)`` one-hot size classes of pair representatives: a free function of
    the size in the odd part of a game (at size n / 2 that part is zero)."""
    sizes = masks.sum(1)
    return (sizes[:, None] == np.unique(sizes[2 * sizes < masks.shape[1]])).astype(float)


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
