"""What every captum-mllm Shapley estimator shares.

An estimator is a Captum ``PerturbationAttribution``: it perturbs an input
tensor by groups of features (``feature_mask``) towards ``baselines``, calls
the forward function in batches of ``perturbations_per_eval``, and returns
attributions shaped like the input. Internally it sees a *game*: a function
from coalitions (``(m, n)`` bool masks over n features) to values ``(m, k)``
(k > 1 when the forward returns several outputs, e.g. one per output token:
every column is solved at once).

Budget: ``budget`` always counts coalition evaluations asked of the game,
before any cache, the empty and the full coalition included.
"""

from __future__ import annotations

import functools
import math
import numbers
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from captum.attr import PerturbationAttribution
from torch import Tensor

from captum_mllm.errors import (
    InvalidOptionError,
    UnsupportedInputError,
    require_int,
    require_real,
    warn_caller,
)
from captum_mllm.process_wide import PROCESS_WIDE

#: The most coalitions an exact computation asks the game for at a time.
EXACT_CHUNK = 8192


class Game:
    """Coalitions -> values of one example, memoised (each mask evaluated once).

    Args:
        evaluate (callable): ``(m, n) bool -> (m, k)`` values.
        n (int): number of players (features).
    """

    def __init__(
        self, evaluate: Callable[[Tensor], Tensor], n: int, chunk: int = EXACT_CHUNK
    ) -> None:
        self.evaluate = evaluate
        self.n = n
        self.chunk = chunk  # coalitions an exact computation asks for at a time
        self.n_requested = 0
        self.memo: dict[bytes, np.ndarray] = {}

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """``(m, n)`` bool masks -> ``(m, k)`` float64 values."""
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n)
        self.n_requested += len(masks)
        keys = [np.packbits(m).tobytes() for m in masks]
        missing = {k: i for i, k in enumerate(keys) if k not in self.memo}
        if missing:
            rows = torch.from_numpy(masks[list(missing.values())])
            values = self.evaluate(rows).detach().cpu().double().numpy().reshape(len(rows), -1)
            self.memo.update(zip(missing, values, strict=True))
        if not keys:  # one feature's orders have no coalitions between the ends
            width = len(next(iter(self.memo.values()))) if self.memo else 0
            return np.zeros((0, width))
        return np.stack([self.memo[k] for k in keys])

    def lookup(self, masks: np.ndarray) -> np.ndarray:
        """Values of coalitions already evaluated, without counting a request."""
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n)
        return np.stack([self.memo[np.packbits(m).tobytes()] for m in masks])

    def ends(self) -> tuple[np.ndarray, np.ndarray]:
        """Values of the empty and of the full coalition: ``(k,)`` each."""
        both = self(np.stack([np.zeros(self.n, bool), np.ones(self.n, bool)]))
        return both[0], both[1]


@dataclass
class Plan:
    """How an estimation may proceed.

    Attributes:
        budget (int): coalition evaluations to ask for at most.
        budget_given (bool): the user set it (else it is the default).
        target_stderr (float or None): stop once every standard error is below it.
        rng (numpy Generator): the sampler's own random numbers.
        progress: the progress bar (``update(game, stderr)``).
        options (dict): method-specific ``attribute`` arguments (e.g. ``tree``).
    """

    budget: int
    target_stderr: float | None
    rng: np.random.Generator
    progress: Any
    options: dict[str, Any] = field(default_factory=dict)
    budget_given: bool = True
    asked: bool = False  # whether the estimator ever asked to stop (read target_stderr)

    def stop(self, stderr: np.ndarray, rounds: int) -> bool:
        """Stop once every standard error is below the target (after two rounds)."""
        self.asked = True
        return (
            self.target_stderr is not None
            and rounds >= 2
            and bool(np.all(stderr <= self.target_stderr))
        )


#: :meth:`ShapleyEstimator.attribute`'s arguments that :meth:`~ShapleyEstimator.check_arguments`
#: leaves to it (they need the input).
_COMMON_ARGUMENTS = frozenset(
    ("inputs", "baselines", "target", "additional_forward_args", "feature_mask", "show_progress",
     "return_stderr")
)  # fmt: skip


class ShapleyEstimator(PerturbationAttribution):
    """Base class of captum-mllm's Shapley estimators (see the module docstring).

    Subclasses implement :meth:`estimate` on a :class:`Game`.

    Args:
        forward_func (callable): the model or function to explain.
    """

    #: Whether estimates always sum to ``f(all) - f(none)`` exactly.
    efficient: bool = True

    #: Whether the mean over seeds is the Shapley value at any budget (else the
    #: estimator is consistent: its small-sample bias vanishes as the budget grows).
    unbiased: bool = True

    #: Whether the standard error is the estimate's spread over seeds (so the
    #: mean of independent trials has it shrink with their number); else it is a
    #: model's, such as a posterior standard deviation.
    stderr_over_seeds: bool = True

    #: Whether the estimator evaluates every coalition (a smaller ``budget`` raises).
    exact: bool = False

    #: The estimator's own ``attribute`` arguments, beyond the common ones (e.g. ``tree``).
    options: tuple[str, ...] = ()

    def __init__(self, forward_func: Callable[..., Any]) -> None:
        super().__init__(forward_func)

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    @abstractmethod
    def estimate(self, game: Game, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """Shapley values ``(k, n)`` and their standard errors ``(k, n)``."""

    def check_arguments(
        self,
        n_features: int | None = None,
        budget: Any = None,
        perturbations_per_eval: Any = 1,
        target_stderr: Any = None,
        seed: Any = None,
        **kwargs: Any,
    ) -> tuple[int | None, int, int | None]:
        """Raise on the arguments :meth:`attribute` would refuse, before any
        coalition is evaluated (:class:`~captum_mllm.MultimodalLLMAttribution`
        checks them before it generates the answer, seconds on a speech model).

        Args:
            n_features (int, optional): the features explained, for the checks
                that need their number (an exact method's budget, a tree).
                Default: None
            budget, perturbations_per_eval, target_stderr, seed: as :meth:`attribute`.
            **kwargs: :meth:`attribute`'s other arguments.

        Returns:
            tuple: ``(budget, perturbations_per_eval, seed)`` as ints (or None).
        """
        unknown = sorted(set(kwargs) - _COMMON_ARGUMENTS - set(self.options))
        if unknown:  # as Python would, rather than run on defaults the caller did not mean
            hint = " (the coalitions to evaluate are budget=)" if "n_samples" in unknown else ""
            raise TypeError(
                f"{type(self).__name__}.attribute() got unexpected keyword arguments "
                f"{unknown}{hint}"
            )
        if budget is not None:  # a float, str or bool raised deep inside, or ran as 1
            budget = require_int("budget (a positive number of coalitions)", budget, 1)
        if target_stderr is not None:  # a str raised deep inside; NaN or <= 0 never stopped
            require_real("target_stderr", target_stderr, above=0)
        if n_features is not None:
            self._check_for(n_features, budget, kwargs)
        per_eval = require_int("perturbations_per_eval", perturbations_per_eval, 1)
        return budget, per_eval, None if seed is None else require_int("seed", seed, 0)

    def check_options(self, n_features: int, options: dict[str, Any]) -> None:
        """Raise on the estimator's own arguments (:attr:`options`) for
        ``n_features`` features (default: nothing to check)."""

    def _check_for(self, n: int, budget: int | None, kwargs: dict[str, Any]) -> None:
        if self.exact and budget is not None and budget < 2**n:
            raise InvalidOptionError(  # it evaluated all 2^n, beyond what was allowed
                f"{type(self).__name__} evaluates all 2^{n} = {2**n:,} coalitions of {n} "
                f"features, more than budget={budget}: leave budget out, or sample within "
                "it (BayesianShapley, LeverageKernelShap)"
            )
        self.check_options(n, {k: v for k, v in kwargs.items() if k in self.options})

    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        baselines: float | Tensor | None = None,
        target: int | list[int] | Tensor | None = None,
        additional_forward_args: Any = None,
        feature_mask: Tensor | tuple[Tensor] | None = None,
        budget: int | None = None,
        perturbations_per_eval: int = 1,
        target_stderr: float | None = None,
        seed: int | None = None,
        show_progress: bool = False,
        return_stderr: bool = False,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Estimate Shapley values of the features of ``inputs``.

        Args:
            inputs (Tensor): one input tensor ``(B, ...)``; each example is
                explained on its own.
            baselines (float or Tensor, optional): values of absent features
                (broadcast to the input; a tensor of the input's shape holds each
                example's own). Default: 0
            target (int, list or Tensor, optional): output column to explain
                when the forward returns ``(B, C)`` scores, one for all examples or
                one per example; None explains every column at once. Default: None
            additional_forward_args (Any, optional): passed after the perturbed
                input; tensors whose first dimension is the batch (or 1) are read
                row by row and repeated for each coalition, as Captum does.
                Default: None
            feature_mask (Tensor, optional): the shape of one example, ``(1, ...)``,
                or the input's (each example's own); equal ids form one feature.
                Default: every element its own
            budget (int, optional): coalition evaluations, before any cache (the
                empty and full coalitions included); exact methods ignore it.
                Default: 10 per feature
            perturbations_per_eval (int, optional): coalitions per forward call.
                Default: 1
            target_stderr (float, optional): stop sampling once every feature's
                standard error is below this (``budget`` stays the cap). Default: None
            seed (int, optional): seed of the sampler's own generator (None:
                drawn from torch's global generator). Default: None
            show_progress (bool, optional): a progress bar over the budget,
                showing the largest standard error. Default: False
            return_stderr (bool, optional): also return the standard errors.
                Default: False
            **kwargs: the estimator's own arguments (:attr:`options`, e.g.
                :class:`HierarchicalShapley`'s ``tree``); others raise ``TypeError``.

        Returns:
            Tensor or (Tensor, Tensor): attributions shaped like ``inputs`` (or
            ``(k, ...)`` for one example when the forward returns k > 1 outputs
            per coalition), and the standard errors in the same shape.

        Examples::

            >>> est = LeverageKernelShap(model)
            >>> attr, stderr = est.attribute(x, budget=200, return_stderr=True)
        """
        budget, perturbations_per_eval, seed = self.check_arguments(
            budget=budget,
            perturbations_per_eval=perturbations_per_eval,
            target_stderr=target_stderr,
            seed=seed,
            **kwargs,
        )
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise UnsupportedInputError(
                    "captum-mllm's estimators take one input tensor; concatenate the inputs "
                    "and group them with feature_mask"
                )
            inputs = inputs[0]
        if isinstance(feature_mask, tuple):
            feature_mask = feature_mask[0]
        if seed is None and self.exact:
            seed = 0  # nothing is drawn: the caller's generator does not move
        elif seed is None:
            with PROCESS_WIDE:  # not inside another thread's seeded run
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        rng = np.random.default_rng(seed)
        batch = inputs.shape[0]
        targets = _targets(target, batch)
        outs, errs = [], []
        for b in range(batch):
            # Captum's per-example forms: baselines, masks and forward arguments
            # whose first dimension is the batch hold one row per example
            row = functools.partial(_row, b=b, batch=batch)
            args = additional_forward_args  # any tensor of batch rows, as Captum expands them
            args = tuple(map(row, args)) if isinstance(args, tuple) else row(args)
            example = _Example(
                self.forward_func,
                inputs[b : b + 1],
                row(baselines, dims=inputs.dim()),
                row(feature_mask, dims=inputs.dim()),
                args,
                targets[b],
                perturbations_per_eval,
                batch,
            )
            self._check_for(example.n, budget, kwargs)
            game = Game(example.evaluate, example.n, exact_chunk(example.ppe))
            cap = 2**example.n if self.exact else 10 * example.n if budget is None else budget
            # beyond 2^n all 2^n are evaluated: the bar ends full ("32/50" read as cut short)
            bar = min(cap, 2**example.n)
            with _progress(show_progress, bar, type(self).__name__) as progress:
                plan = Plan(cap, target_stderr, rng, progress, kwargs, budget is not None)
                phi, stderr = self.estimate(game, plan)
            if target_stderr is not None and not plan.asked and not np.any(stderr):
                warn_caller(  # an exact method, or exact here: nothing to stop early
                    f"target_stderr={target_stderr} is not read: {type(self).__name__} "
                    "evaluated every coalition its values need (exact, standard errors 0)"
                )
            # what the last example cost: coalitions asked for, and distinct ones evaluated
            self.last_n_requested, self.last_n_evaluated = game.n_requested, len(game.memo)
            if budget is not None and game.n_requested > budget and not self.exact:
                warn_caller(  # a sampler's smallest estimate costs more than was allowed
                    f"{type(self).__name__} asked for {game.n_requested} coalitions of "
                    f"{example.n} features, its smallest estimate, beyond budget={budget}"
                )
            outs.append(example.shape_like_input(phi))
            errs.append(example.shape_like_input(stderr))
        if len(outs) > 1 and outs[0].shape[0] > 1:
            raise UnsupportedInputError("several examples with several outputs each are ambiguous")
        attributions = torch.cat(outs).to(inputs.device)
        stderrs = torch.cat(errs).to(inputs.device)
        return (attributions, stderrs) if return_stderr else attributions


class _Example:
    """One example's game: masks over features -> perturbed inputs -> forward."""

    def __init__(
        self,
        forward_func: Callable[..., Any],
        example: Tensor,
        baselines: float | Tensor | None,
        feature_mask: Tensor | None,
        additional_forward_args: Any,
        target: int | None,
        perturbations_per_eval: int,
        batch: int = 1,
    ) -> None:
        self.forward_func = forward_func
        self.example = example
        self.batch = batch
        shape = example.shape[1:]
        base = torch.zeros_like(example) if baselines is None else torch.as_tensor(baselines)
        self.baseline = base.to(example.device, example.dtype).expand_as(example)
        if feature_mask is None:
            ids = torch.arange(example[0].numel(), device=example.device).reshape(shape)
        elif feature_mask.numel() != example[0].numel():  # other rows were read as example 0's
            raise InvalidOptionError(
                f"feature_mask of shape {tuple(feature_mask.shape)} fits neither one example "
                f"{tuple(shape)} nor the batch of {batch}"
            )
        else:
            ids = feature_mask.reshape(shape).to(example.device)
        unique, index = torch.unique(ids, return_inverse=True)
        self.index = index  # element -> feature 0..n-1
        self.n = len(unique)
        self.args = additional_forward_args
        self.target = target
        self.ppe = perturbations_per_eval

    def evaluate(self, masks: Tensor) -> Tensor:
        """``(m, n)`` bool -> ``(m, k)``: forwards in chunks of
        ``perturbations_per_eval``. When the first additional forward argument
        has ``evaluate_batches(perturbed, batch)`` (``MultimodalLLMAttribution``'s
        does), it gets all the coalitions at once and batches them itself."""
        first = self.args[0] if isinstance(self.args, tuple) and self.args else self.args
        batches = getattr(first, "evaluate_batches", None)
        if callable(batches):
            masks = masks.to(self.example.device)
            perturbed = torch.where(masks[:, self.index], self.example, self.baseline)
            return self._target(batches(perturbed, self.ppe).reshape(len(masks), -1).detach())
        out = []
        for start in range(0, len(masks), self.ppe):
            chunk = masks[start : start + self.ppe].to(self.example.device)
            keep = chunk[:, self.index]  # (c, *shape)
            perturbed = torch.where(keep, self.example, self.baseline)
            args = _expand(self.args, len(chunk))
            values = torch.as_tensor(self.forward_func(perturbed, *args))
            if values.dim() == 0 and (len(chunk) > 1 or self.batch > 1):
                raise UnsupportedInputError(  # one value for several rows: their sum, or mean
                    "the forward returns one value for a batch of inputs (Captum's aggregate "
                    "mode); captum-mllm's estimators explain each example on its own and call "
                    "the forward with a batch of coalitions: return one value (or row of "
                    "values) per input row"
                )
            values = values.reshape(len(chunk), -1)
            out.append(self._target(values.detach()))
        return torch.cat(out)

    def _target(self, values: Tensor) -> Tensor:
        return values if self.target is None else values[:, self.target : self.target + 1]

    def shape_like_input(self, phi: np.ndarray) -> Tensor:
        """``(k, n)`` feature values -> ``(k, *input shape)`` (each element its feature's)."""
        dtype = self.example.dtype if self.example.is_floating_point() else torch.float32
        values = torch.from_numpy(np.asarray(phi, dtype=np.float64)).to(dtype)
        return values[:, self.index.reshape(-1).cpu()].reshape(len(values), *self.example.shape[1:])


def _row(value: Any, b: int, batch: int, dims: int | None = None) -> Any:
    """Example ``b``'s row of a tensor that holds one row per example (of ``dims``
    dimensions when given), else ``value``."""
    if not isinstance(value, Tensor) or batch == 1 or value.dim() == 0 or len(value) != batch:
        return value
    return value[b : b + 1] if dims is None or value.dim() == dims else value


def _targets(target: Any, batch: int) -> list[int | None]:
    """Each example's output column: one int for all, or one per example (Captum's forms)."""
    if target is None or isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return [None if target is None else int(target)] * batch
    if isinstance(target, Tensor) and target.dim() <= 1 and not target.is_floating_point():
        target = target.reshape(-1).tolist()
    if isinstance(target, list) and all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target
    ):
        if len(target) == 1:
            return [int(target[0])] * batch
        if len(target) == batch:
            return [int(t) for t in target]
    raise UnsupportedInputError(
        f"target must be an int or one int per example ({batch}) for captum-mllm's "
        f"estimators, got {target!r}"
    )


def _expand(args: Any, size: int) -> tuple[Any, ...]:
    """Repeat tensor arguments with a batch of one along dim 0, as Captum does."""
    if args is None:
        return ()
    args = args if isinstance(args, tuple) else (args,)
    return tuple(
        a.repeat_interleave(size, dim=0)
        if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == 1
        else a
        for a in args
    )


class _progress:
    """A tqdm bar over the budget (or nothing), updated with the largest stderr."""

    def __init__(self, show: bool, total: int, name: str) -> None:
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"{name} coalitions")

    def __enter__(self) -> _progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def expect(self, total: int) -> None:
        """The coalitions the estimate will ask for, once the estimator knows."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, game: Game, stderr: np.ndarray | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = min(game.n_requested, self.bar.total or game.n_requested)
        if stderr is not None and np.isfinite(stderr).all():  # shown by the refresh below
            self.bar.set_postfix(max_stderr=f"{float(np.max(stderr)):.3g}", refresh=False)
        self.bar.refresh()


def exact_chunk(perturbations_per_eval: int) -> int:
    """Coalitions an exact computation asks the game for at a time, the bar
    moving between: 8 forwards' worth, from 512 (a CPU's 64 a forward: about
    10 s on SmolLM2-135M) to :data:`EXACT_CHUNK` (a GPU's 1,024)."""
    return min(EXACT_CHUNK, max(512, 8 * perturbations_per_eval))


def evaluate_in_chunks(game: Game, masks: np.ndarray, progress: Any) -> np.ndarray:
    """``game(masks)``, ``game.chunk`` rows at a time, the progress bar updated
    after each (one call held an exact run's bar at 0 for hours)."""
    parts = []
    for start in range(0, len(masks), game.chunk):
        parts.append(game(masks[start : start + game.chunk]))
        progress.update(game)
    return np.concatenate(parts)


def shapley_weight(n: int, size: int) -> float:
    """``|S|! (n - |S| - 1)! / n!``: the Shapley weight of a coalition S of
    ``size`` players not holding the player being valued."""
    return math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)


def mean_and_stderr(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over independent units ``(u, k, n)`` and its standard error (inf for one unit)."""
    mean = units.mean(axis=0)
    if len(units) < 2:
        return mean, np.full_like(mean, np.inf)
    return mean, units.std(axis=0, ddof=1) / math.sqrt(len(units))
