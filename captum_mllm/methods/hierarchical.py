"""Owen values over a tree of features (hierarchical Shapley)."""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from captum_mllm.errors import InvalidOptionError, require_int, warn_caller
from captum_mllm.methods.base import (
    Game,
    Plan,
    ShapleyEstimator,
    evaluate_in_chunks,
    shapley_weight,
)
from captum_mllm.methods.permutation import paired_order_sampling

Tree = Sequence[Any]  # nested lists whose leaves are feature indices
#: Exact Owen values needing more coalitions than this warn (name budget=).
EXACT_WARNING = 2**14
#: Exact Owen values needing more are refused, as ExactShapleyValues refuses
#: more than 2^20 (its default of 20 features).
EXACT_REFUSAL = 2**20


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

    The tree is the ``attribute`` argument ``tree=`` (nested lists of feature
    indices; with a :class:`~captum_mllm.ChatInput`, its
    :meth:`~captum_mllm.ChatInput.feature_tree`, a node of more than
    ``max_children`` split by :func:`split_wide`). Without one the features
    are a flat list, whose Owen values are their Shapley values; more than
    ``max_children`` features are split into consecutive groups the same way.

    When ``budget`` is given and the exact computation needs more coalitions,
    orders that keep every subtree together are sampled instead (each with
    its reverse): an unbiased, exactly efficient estimate with standard errors.
    With ``level_estimator`` (any captum-mllm estimator class, e.g.
    ``LeverageKernelShap``) the estimate is made level by level instead: at
    each node the children's values come from that estimator on the game of
    the children (exactly when ``2^children`` fits the node's share of the
    budget); a child group's value is split among its own children by the
    same procedure in random contexts of its siblings (paired: the siblings
    before it in a random order, and those after it), averaged, and shifted
    so that they add up to the group's value. Unbiased when the level
    estimator is, exactly efficient at every level. A budget below what one
    estimate per level needs falls back to the sampled orders.

    Without ``budget`` the values are exact; a tree whose exact values need
    more than :data:`EXACT_WARNING` coalitions warns (a budget samples them),
    and one needing more than :data:`EXACT_REFUSAL` is refused.
    With ``exact_limit``, such a tree is sampled instead, at the samplers'
    default budget (10 coalitions per feature), with a warning that says so:
    a bound on the time of a run whose chat is not known in advance (the
    command line's default).

    With ``prune > 0``, a top-level group whose value is below ``prune`` times
    the largest top-level group's is not expanded: its features share its
    value equally (fewer coalitions, documented approximation).

    Args:
        forward_func (callable): the model or function to explain.
        max_children (int, optional): refuse a node with more children; split
            it into sub-groups instead. Default: 16
        prune (float, optional): see above. Default: 0.0
        level_estimator (type, optional): the estimator used at each level when
            the budget is short (see above). Default: None (sampled orders)
        contexts (int, optional): sibling contexts (an even number: pairs)
            each child group is split in, with ``level_estimator``. Default: 4
        exact_limit (int, optional): without ``budget``, sample a tree whose
            exact values need more coalitions than this (see above).
            Default: None (exact values, however many they need)

    Examples::

        >>> tree = [[0, 1, 2], [[3, 4], [5, 6, 7]]]  # two turns, the second in two parts
        >>> attr = HierarchicalShapley(model).attribute(x, tree=tree)
    """

    options = ("tree",)

    def __init__(
        self,
        forward_func: Any,
        max_children: int = 16,
        prune: float = 0.0,
        level_estimator: type[ShapleyEstimator] | None = None,
        contexts: int = 4,
        exact_limit: int | None = None,
    ) -> None:
        super().__init__(forward_func)
        require_int("max_children", max_children, 2)  # a str failed late, 1 or 0 in the tree
        if not isinstance(contexts, int) or contexts < 2 or contexts % 2:
            raise InvalidOptionError(f"contexts must be an even number >= 2, got {contexts}")
        if level_estimator is not None and not (
            isinstance(level_estimator, type) and issubclass(level_estimator, ShapleyEstimator)
        ):  # read only when a budget is short: a wrong one failed late, or never
            raise InvalidOptionError(
                "level_estimator must be a captum-mllm estimator class (e.g. "
                f"LeverageKernelShap), got {level_estimator!r}"
            )
        if not 0 <= prune <= 1:
            raise InvalidOptionError(f"prune must be between 0 and 1, got {prune!r}")
        self.max_children = max_children
        self.prune = prune
        self.level_estimator = level_estimator
        self.contexts = contexts
        self.exact_limit = (
            None if exact_limit is None else require_int("exact_limit", exact_limit, 1)
        )

    def check_options(self, n_features: int, options: dict[str, Any]) -> None:
        """A given ``tree`` must hold each feature once (see :meth:`attribute`)."""
        if options.get("tree") is not None:
            _check_tree(options["tree"], n_features, self.max_children)

    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        n = game.n
        tree = plan.options.get("tree")
        if tree is None:  # a flat list (Shapley values), split above max_children
            tree = split_wide(list(range(n)), self.max_children)
        root = _check_tree(tree, n, self.max_children)
        expand = [True] * len(root)
        if self.prune > 0 and len(root) > 1:
            groups = [_leaves(child) for child in root]
            group_values = _evaluate(game, _terms(groups, 0, 1.0, flat=True), n, len(groups))
            size = np.abs(group_values).max(axis=1)  # (n_groups,): largest over outputs
            expand = list(size >= self.prune * size.max())
        needed = exact_cost(root, expand)  # counted: listing them took 45 s at 100 leaves
        over_limit = self.exact_limit is not None and needed > self.exact_limit
        if needed > plan.budget and (plan.budget_given or over_limit):
            if not plan.budget_given:
                warn_caller(
                    f"exact Owen values of this tree need {needed:,} coalitions, more than "
                    f"exact_limit={self.exact_limit:,}: sampling {plan.budget:,} instead "
                    "(give budget= for more)"
                )
            if self.level_estimator is not None and plan.budget - 2 >= self._min_cost(root):
                phi, var = self._by_level(game, root, 0, plan.budget - 2, plan)
                plan.progress.update(game)
                return phi, np.sqrt(var)
            # Too many for the budget: sample orders that keep every subtree together.
            return paired_order_sampling(game, plan, lambda rng: _consistent_order(root, rng))
        if needed > EXACT_REFUSAL:  # their list alone would not fit in memory
            raise InvalidOptionError(
                f"exact Owen values of this tree need {needed:,} coalitions, more than "
                f"{EXACT_REFUSAL:,}: give budget= to sample orders that keep its groups "
                "together (or exact_limit= to sample where exact values cost more)"
            )
        if needed > EXACT_WARNING:  # hours on a real model, where a budget takes minutes
            warn_caller(
                f"exact Owen values of this tree need {needed:,} coalitions: give budget= to "
                "sample orders that keep its groups together instead"
            )
        plan.progress.expect(needed)
        phi = _evaluate(game, _terms(root, 0, 1.0, expand=expand), n, n, plan.progress)
        return phi.T, np.zeros_like(phi.T)  # (k, n); exact, no sampling error

    def _by_level(
        self, game: Game, node: list[Any], outside: int, budget: int, plan: Plan
    ) -> tuple[np.ndarray, np.ndarray]:
        """Values ``(k, n)`` (zero off this node's leaves) and their variances,
        with the features in ``outside`` present throughout."""
        n, m = game.n, len(node)
        bits = [sum(1 << leaf for leaf in _leaves(c)) for c in node]
        groups = [j for j, c in enumerate(node) if _is_group(c)]
        floors = {j: self._min_cost(list(node[j])) for j in groups}  # per context
        needed = self.contexts * sum(floors.values())
        own = min(2**m, max(min(2**m, 2 * m + 2), budget // (1 + len(groups))), budget - needed)
        spare = budget - own  # split over the groups' contexts in proportion to their floors
        inner = {j: spare * floors[j] // max(1, needed) for j in groups}

        def children_game(rows: torch.Tensor) -> torch.Tensor:
            chosen = rows.numpy().astype(bool)
            full = np.array(
                [outside | sum(b for b, c in zip(bits, r, strict=True) if c) for r in chosen],
                dtype=object,
            )
            masks = ((full[:, None] >> np.arange(n)) & 1).astype(bool)
            return torch.from_numpy(game(masks))

        sub = Game(children_game, m)
        if 2**m <= own:
            psi = _evaluate(sub, _terms(list(range(m)), 0, 1.0), m, m).T  # (k, m) exact
            psi_var = np.zeros_like(psi)
        else:
            sub_plan = Plan(own, None, plan.rng, _Quiet(), {}, True)
            psi, psi_se = self.level_estimator(self.forward_func).estimate(sub, sub_plan)  # type: ignore[misc]
            psi_var = psi_se**2
        k = psi.shape[0]
        phi, var = np.zeros((k, n)), np.zeros((k, n))
        for j, child in enumerate(node):
            if not _is_group(child):
                phi[:, int(child)], var[:, int(child)] = psi[:, j], psi_var[:, j]
                continue
            leaves = _leaves(child)
            if self.prune > 0 and np.abs(psi[:, j]).max() < self.prune * np.abs(psi).max():
                phi[:, leaves] = psi[:, j : j + 1] / len(leaves)  # not expanded: equal shares
                var[:, leaves] = psi_var[:, j : j + 1] / len(leaves) ** 2
                continue
            draws = []
            for _ in range(self.contexts // 2):
                order = [i for i in plan.rng.permutation(m) if i != j]
                cut = int(plan.rng.integers(0, m))  # j's place in the order
                for side in (order[:cut], order[cut:]):  # before j, and after it (paired)
                    context = outside | sum(bits[i] for i in side)
                    draws.append(self._by_level(game, list(child), context, inner[j], plan)[0])
            draws_arr = np.stack(draws)  # (contexts, k, n)
            mean = draws_arr.mean(0)
            pairs = draws_arr.reshape(-1, 2, k, n).mean(1)  # independent units
            unit_var = (
                pairs.var(0, ddof=1) / len(pairs) if len(pairs) > 1 else np.full((k, n), np.inf)
            )
            shift = (psi[:, j] - mean[:, leaves].sum(1)) / len(leaves)  # efficiency in the group
            phi[:, leaves] = mean[:, leaves] + shift[:, None]
            var[:, leaves] = unit_var[:, leaves] + psi_var[:, j : j + 1] / len(leaves) ** 2
        return phi, var

    def _min_cost(self, node: list[Any]) -> int:
        """The fewest coalitions :meth:`_by_level` needs below ``node``."""
        m = len(node)
        own = min(2**m, 2 * m + 2)
        return own + sum(self.contexts * self._min_cost(list(c)) for c in node if _is_group(c))


class _Quiet:
    """No progress bar (an inner level's estimate)."""

    def update(self, game: Game, stderr: np.ndarray | None = None) -> None:
        return None

    def expect(self, total: int) -> None:
        return None


def _is_group(node: Any) -> bool:
    return isinstance(node, Sequence) and not isinstance(node, str)


def _consistent_order(node: Any, rng: np.random.Generator) -> np.ndarray:
    """A random order of the leaves keeping every subtree together (children
    shuffled at each level); its reverse keeps them together too."""
    if not (isinstance(node, Sequence) and not isinstance(node, str)):
        return np.array([int(node)])
    children = list(node)
    return np.concatenate(
        [_consistent_order(children[i], rng) for i in rng.permutation(len(children))]
    )


def exact_cost(tree: Tree, expand: list[bool] | None = None) -> int:
    """The distinct coalitions exact Owen values over ``tree`` evaluate,
    counted without listing them (``expand``: which top-level groups are
    expanded, as with ``prune``).

    At a node of ``m`` children a coalition holds each child whole or not at
    all, but for at most one child, which holds one of its own coalitions
    other than none and all: ``2^m + 2^(m-1) * sum(cost(child) - 2)``, and
    a leaf (or a group left whole) costs 2.

    Examples::

        >>> exact_cost([[0, 1], [2, 3]])   # 2^2 + 2 * (2 + 2)
        12
    """

    def cost(node: Any, expand: list[bool] | None = None) -> int:
        if not _is_group(node):
            return 2
        m, flags = len(node), expand or [True] * len(node)
        inner = sum((cost(c) if e else 2) - 2 for c, e in zip(node, flags, strict=True))
        return 2**m + 2 ** (m - 1) * inner

    return cost(list(tree), expand)


def split_wide(tree: Tree, max_children: int = 16) -> list[Any]:
    """``tree`` with every node of more than ``max_children`` children split
    into consecutive groups of about equal size: a level the exact values
    can afford, inserted where a long sentence (or a chat of many turns)
    would be refused.

    About ``sqrt(m)`` groups of about ``sqrt(m)`` children each: exact Owen
    values of ``g`` groups of ``m / g`` need about ``g * 2^g * 2^(m / g)``
    coalitions, fewest where the two exponents meet.

    Examples::

        >>> split_wide([list(range(20))], max_children=16)
        [[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]]
    """

    def split(node: Any) -> Any:
        if not _is_group(node):
            return node
        children = [split(child) for child in node]
        m = len(children)
        if m <= max_children:
            return children
        groups = min(max_children, max(-(-m // max_children), round(math.sqrt(m))))
        bounds = np.linspace(0, m, groups + 1).round().astype(int)
        chunks = [children[a:b] for a, b in itertools.pairwise(bounds)]
        return split([chunk[0] if len(chunk) == 1 else chunk for chunk in chunks])

    return list(split(list(tree)))


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
    if not isinstance(node, bool):  # True is no index, though Python reads it as 1
        with contextlib.suppress(TypeError):  # ints, numpy's too; not 1.5 or "1"
            return [operator.index(node)]
    raise InvalidOptionError(f"tree leaves must be feature indices (ints), got {node!r}")


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
            for chosen in itertools.combinations(others, r):
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


def _evaluate(game: Game, terms: Any, n: int, players: int, progress: Any = None) -> np.ndarray:
    """Sum the terms' weighted gains: ``(players, k)``, every coalition evaluated once."""
    terms = list(terms)
    coalitions = sorted({c for _, c, _, _ in terms} | {c | a for _, c, a, _ in terms})
    index = {c: i for i, c in enumerate(coalitions)}
    masks = ((np.array(coalitions, dtype=object)[:, None] >> np.arange(n)) & 1).astype(bool)
    values = game(masks) if progress is None else evaluate_in_chunks(game, masks, progress)
    out = np.zeros((players, values.shape[1]))
    for player, without, adds, weight in terms:
        out[player] += weight * (values[index[without | adds]] - values[index[without]])
    return out
