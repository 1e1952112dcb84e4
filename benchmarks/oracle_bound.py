"""How low can a Shapley estimate's error go at a given budget? The error of an
estimator that already knows the shape of each game's answer.

In ``x = 2 z - 1`` coding (+1 present, -1 absent) a game is a sum of Walsh
terms ``c_T prod(x_i, i in T)``. Only terms of odd order carry Shapley values
(``2 c_T / |T|`` to each member), and a coalition with its complement observes
exactly the odd part. ``BayesianShapley`` is the posterior mean of a Gaussian
process over those terms, with a prior it fits from the values it sampled.

The oracle here is the same posterior mean, but its prior gives every odd
term the variance ``c_T^2`` it really has: the game's whole spectrum, read
from all 2^n values. It runs on the coalitions ``BayesianShapley`` chooses
and on those that are A-optimal for the oracle's own prior (the same greedy
choice from the same candidate pool). An estimator that must learn its prior
from ``budget`` values cannot be expected to beat the second.

For each game of ``estimators.py``, at 10n coalitions (mean over seeds), it
prints Captum's ``ShapleyValueSampling``, issue 17's goal (a fifth of it),
``BayesianShapley`` and the two oracles.

Run: ``python benchmarks/oracle_bound.py [--seeds 10] [--skip-real] [--factor 10]``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from estimators import OURS, Table, captum, error, games, ours
from host import describe

from captum_mllm.methods.bayes import _candidates, _greedy_design


def walsh(values: np.ndarray) -> np.ndarray:
    """``c`` with ``values[z] = sum over T of c[T] prod(2 z_i - 1, i in T)``
    (coalitions and terms as bit masks)."""
    c = values.astype(np.float64)
    h = 1
    while h < len(c):  # fast Walsh-Hadamard transform: sum of values[z] (-1)^|T & z|
        c = c.reshape(-1, 2 * h)
        c = np.concatenate([c[:, :h] + c[:, h:], c[:, :h] - c[:, h:]], axis=1).reshape(-1)
        h *= 2
    order = np.array([bin(t).count("1") for t in range(len(c))])
    return np.where(order % 2, -1.0, 1.0) * c / len(c)


class OddTerms:
    """The odd-order Walsh terms of an n-player game."""

    def __init__(self, n: int) -> None:
        codes = np.arange(2**n)
        order = np.array([bin(t).count("1") for t in codes])
        self.codes = codes[order % 2 == 1]
        self.members = (self.codes[:, None] >> np.arange(n)) & 1  # (F, n)
        # phi = shapley.T @ c: each term's 2 c_T / |T| to each of its members
        self.shapley = 2.0 * self.members / order[self.codes][:, None]

    def chi(self, masks: np.ndarray) -> np.ndarray:
        """``(p, F)``: each term at each coalition, ``(-1) ** (members absent)``."""
        absent = (~masks).astype(np.int64) @ self.members.T
        return np.where(absent % 2 == 0, 1.0, -1.0)

    def posterior_phi(self, prior: np.ndarray, masks: np.ndarray, half: np.ndarray) -> np.ndarray:
        """Posterior mean of the Shapley values given the odd part ``half``
        observed at ``masks``, under independent terms of variance ``prior``."""
        x = self.chi(masks)
        gram = (x * prior) @ x.T
        gram += 1e-9 * np.trace(gram) / len(gram) * np.eye(len(gram))
        coef = prior * (x.T @ np.linalg.solve(gram, half))
        return self.shapley.T @ coef


def odd_part(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(v(S) - v(complement of S)) / 2`` of each coalition."""
    bits = 1 << np.arange(masks.shape[1])
    return (values[masks.astype(np.int64) @ bits] - values[(~masks).astype(np.int64) @ bits]) / 2


def oracle_design(
    terms: OddTerms, prior: np.ndarray, n: int, pairs: int, rng: np.random.Generator
) -> np.ndarray:
    """The empty coalition and ``pairs`` more, each the candidate that most
    lowers the posterior variance of the Shapley values under ``prior`` (the
    greedy A-optimal choice ``BayesianShapley`` makes under its own priors)."""
    cand = _candidates(n, max(2000, 4 * pairs), rng)
    x = terms.chi(cand)
    cov = (x * prior) @ x.T  # candidates' values
    cross = x @ (prior[:, None] * terms.shapley)  # (m, n): each value with each phi
    var = np.diag(cov).copy()
    factor = np.zeros((len(cand), 0))
    chosen = [int(np.flatnonzero(~cand.any(1))[0])]
    for step in range(pairs + 1):
        if step:
            gain = (cross**2).sum(1) / np.maximum(var, 1e-300)
            gain[chosen] = -np.inf
            chosen.append(int(np.argmax(gain)))
        j = chosen[-1]
        k = cov[:, j] - factor @ factor[j]
        vj = max(var[j], 1e-300)
        cross = cross - np.outer(k / vj, cross[j])
        var = var - k**2 / vj
        factor = np.column_stack([factor, k / math.sqrt(vj)])
    return cand[chosen]


def bounds(table: Table, budget: int, seeds: int) -> dict[str, float]:
    """Mean errors over seeds at ``budget`` coalitions."""
    n = table.n
    terms = OddTerms(n)
    prior = walsh(table.values)[terms.codes] ** 2
    pairs = (budget - 2) // 2
    out: dict[str, list[float]] = {}
    for seed in range(seeds):
        # BayesianShapley's own coalitions: its design is the first draw of default_rng(seed)
        theirs = _greedy_design(n, pairs, 2000, np.random.default_rng(seed))
        own = oracle_design(terms, prior, n, pairs, np.random.default_rng(seed))
        runs = {
            "Captum SVS": captum("ShapleyValueSampling")(table, budget, seed),
            "BayesianShapley": ours(OURS["ours BayesianShapley"])(table, budget, seed),
        }
        with_empty = np.concatenate([np.zeros((1, n), bool), theirs])  # as BayesianShapley reads it
        for name, masks in [("oracle, its design", with_empty), ("oracle, own design", own)]:
            runs[name] = terms.posterior_phi(prior, masks, odd_part(table.values, masks))
        for name, est in runs.items():
            out.setdefault(name, []).append(error(est, table.exact))
    return {name: float(np.mean(v)) for name, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--factor", type=int, default=10, help="budget: factor x n coalitions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe())
    results = {
        name: bounds(t, args.factor * t.n, args.seeds)
        for name, (t, _) in games(args.skip_real).items()
    }
    print(f"\nrelative L2 error at {args.factor}n coalitions, mean over {args.seeds} seeds")
    cols = [
        "Captum SVS",
        "goal (SVS / 5)",
        "BayesianShapley",
        "oracle, its design",
        "oracle, own design",
    ]
    print(f"{'game':12s}" + "".join(f"{c:>20s}" for c in cols))
    for game, errors in results.items():
        errors["goal (SVS / 5)"] = errors["Captum SVS"] / 5
        print(f"{game:12s}" + "".join(f"{errors[c]:20.4f}" for c in cols))


if __name__ == "__main__":
    main()
