"""Owen values over a tree of features (hierarchical Shapley)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from captum_mllm.errors import InvalidOptionError
from captum_mllm.methods.base import Game, Plan, ShapleyEstimator, shapley_weight
from captum_mllm.methods.permutation import paired_order_sampling

Tree = Sequence[Any]  # nested lists whose leaves are feature indices


class HierarchicalShapley(ShapleyEstimator):
    """Owen (Winter) values over a tree of features: turns, then parts, then words.

    A feature's value is its expected marginal contribution over the orders
    that keep every subtree together (subtrees in random order at each level,
    features in random order inside). Exactly: at each node the value of a
    child is its Shapley value among its siblings, and that value is split
    among the child's own children with the siblings chosen before it
    present. The cost grows with the branching at each level, not with the
    number of leaves: a leaf needs ``prod 2^(siblings at each level)``
    coalitions, where exact Shapley over all leaves needs ``2^n``.

    When ``budget`` is given and the exact computation needs more coalitions,
    orders that keep every subtree together are sampled instead (each with
    its reverse): an unbiased, exactly efficient estimate with standard errors.

    With ``prune > 0``, a top-level group whose value is below ``prune`` times
    the largest top-level group's is not expanded: its features share its
    value equally (fewer coalitions, documented approximation).

    Args:
        forward_func (callable): the model or function to explain.
        max_children (int, optional): refuse a node with more children; split
            it into sub-groups instead. Default: 16
        prune (float, optional): see above. Default: 0.0

    Examples::

        >>> tree = [[0, 1, 2], [[3, 4], [5, 6, 7]]]  # two turns, the second in two parts
        >>> attr = HierarchicalShapley(model).attribute(x, tree=tree)
    """

    def __init__(self, forward_func: Any, max_children: int = 16, prune: float = 0.0) -> None:
        super().__init__(forward_func)
        self.max_children = max_children
        self.prune = prune

    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        n = game.n
        tree = plan.options.get("tree")
        root = _check_tree(list(range(n)) if tree is None else tree, n, self.max_children)
        expand = [True] * len(root)
        if self.prune > 0 and len(root) > 1:
            groups = [_leaves(child) for child in root]
            group_values = _evaluate(game, _terms(groups, 0, 1.0, flat=True), n, len(groups))
            size = np.abs(group_values).max(axis=1)  # (n_groups,): largest over outputs
            expand = list(size >= self.prune * size.max())
        terms = list(_terms(root, 0, 1.0, expand=expand))
        needed = len({c for _, c, _, _ in terms} | {c | a for _, c, a, _ in terms})
        if plan.budget_given and needed > plan.budget:
            # Too many for the budget: sample orders that keep every subtree together.
            return paired_order_sampling(game, plan, lambda rng: _consistent_order(root, rng))
        phi = _evaluate(game, terms, n, n)
        plan.progress.update(game)
        return phi.T, np.zeros_like(phi.T)  # (k, n); exact, no sampling error


def _consistent_order(node: Any, rng: np.random.Generator) -> np.ndarray:
    """A random order of the leaves keeping every subtree together (children
    shuffled at each level); its reverse keeps them together too."""
    if not (isinstance(node, Sequence) and not isinstance(node, str)):
        return np.array([int(node)])
    children = list(node)
    return np.concatenate(
        [_consistent_order(children[i], rng) for i in rng.permutation(len(children))]
    )


def _check_tree(tree: Tree, n: int, max_children: int) -> list[Any]:
    leaves = _leaves(tree)
    if sorted(leaves) != list(range(n)):
        raise InvalidOptionError(
            f"tree must hold each feature index 0..{n - 1} exactly once, got {sorted(leaves)}"
        )

    def check(node: Any) -> None:
        if isinstance(node, Sequence) and not isinstance(node, str):
            if len(node) > max_children:
                raise InvalidOptionError(
                    f"a tree node has {len(node)} children (max_children={max_children}); "
                    "group them into sub-lists"
                )
            for child in node:
                check(child)

    check(tree)
    return list(tree)


def _leaves(node: Any) -> list[int]:
    if isinstance(node, Sequence) and not isinstance(node, str):
        return [leaf for child in node for leaf in _leaves(child)]
    return [int(node)]


def _terms(
    node: Sequence[Any],
    outside: int,
    coef: float,
    expand: list[bool] | None = None,
    flat: bool = False,
) -> Any:
    """Yield ``(player, coalition bits without it, bits it adds, weight)``: the
    value of a player is the sum of ``weight * (v(coalition | adds) - v(coalition))``.

    Players are leaves, or whole children that are not expanded (``flat``
    makes every child of ``node`` a player, indexed by its position).
    """
    children = list(node)
    m = len(children)
    bits = [sum(1 << leaf for leaf in _leaves(c)) for c in children]
    for j, child in enumerate(children):
        others = [bits[i] for i in range(m) if i != j]
        for r in range(m):
            weight = coef * shapley_weight(m, r)
            for chosen in combinations(others, r):
                with_others = outside | sum(chosen)
                is_group = isinstance(child, Sequence) and not isinstance(child, str)
                if flat:
                    yield j, with_others, bits[j], weight
                elif not is_group:
                    yield int(child), with_others, bits[j], weight
                elif expand is not None and not expand[j]:
                    for leaf in _leaves(child):  # not expanded: an equal share each
                        yield leaf, with_others, bits[j], weight / len(_leaves(child))
                else:
                    yield from _terms(child, with_others, weight)


def _evaluate(game: Game, terms: Any, n: int, players: int) -> np.ndarray:
    """Sum the terms' weighted gains: ``(players, k)``, every coalition evaluated once."""
    terms = list(terms)
    coalitions = sorted({c for _, c, _, _ in terms} | {c | a for _, c, a, _ in terms})
    index = {c: i for i, c in enumerate(coalitions)}
    masks = (np.array(coalitions, dtype=object)[:, None] >> np.arange(n)) & 1
    values = game(masks.astype(bool))
    out = np.zeros((players, values.shape[1]))
    for player, without, adds, weight in terms:
        out[player] += weight * (values[index[without | adds]] - values[index[without]])
    return out
