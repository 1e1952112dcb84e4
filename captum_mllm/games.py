"""The value function of one explanation: a coalition matrix ``(U, n)`` to
the target's values, for a :class:`ChatInput` (through the adapter) and for
Captum's own inputs (their token ids, or Captum's own forward for images), and
what Captum's perturbation method is handed in its place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from captum.attr import ImageMaskInput, InterpretableInput
from torch import Tensor

from captum_mllm import captum_compat
from captum_mllm.coalitions import CoalitionEvaluator
from captum_mllm.contrastive import ContrastiveTarget
from captum_mllm.encoding import coalition_key
from captum_mllm.errors import UnsupportedInputError
from captum_mllm.inputs import ChatInput
from captum_mllm.models.base import Response
from captum_mllm.targets import LogProbTarget, TargetValues, coalition_seed

if TYPE_CHECKING:
    from captum_mllm.attribution import MultimodalLLMAttribution


@dataclass(frozen=True)
class ValueGame:
    """The value function of one explanation: ``(U, n) -> TargetValues`` with
    ``n_columns`` columns of kind ``columns``."""

    evaluate: Callable[[Tensor], TargetValues]
    n_columns: int
    columns: str
    stock_calls: list[int] | None = None  # model calls made by Captum's own forward
    row_length: Callable[[Tensor], Tensor] | None = None  # (U, n) -> model input lengths


@dataclass
class BaselineDraws:
    """Seeds of the baselines a Captum input draws for each coalition
    (``ProductBaselines``): one draw per coalition and trial, from (the trial's
    seed, the coalition), so a value does not depend on batch or order."""

    seed: int

    def of(self, coalition: Tensor) -> int:
        return coalition_seed(self.seed, coalition_key(coalition))


@dataclass(frozen=True)
class MethodCall:
    """What Captum hands the forward function: not a tensor, so never repeated."""

    evaluator: CoalitionEvaluator
    n_columns: int

    def evaluate_batches(self, perturbed: Tensor, batch: int) -> Tensor:
        """All of an estimator's coalitions at once, ``batch`` a forward (see
        :meth:`CoalitionEvaluator.evaluate_batches`)."""
        return self.columns(self.evaluator.evaluate_batches(perturbed, batch))

    def columns(self, values: Tensor) -> Tensor:
        # (B, n_columns) for multi-output methods, else (B,)
        return values[:, : self.n_columns] if self.n_columns > 1 else values[:, 0]


def value_game(
    attribution: MultimodalLLMAttribution,
    inp: InterpretableInput,
    response: Response,
    per_step: bool,
    reuse_prefix: bool,
    draws: BaselineDraws | None = None,
) -> ValueGame:
    """The value of each coalition of ``inp``'s features: ``attribution``'s
    target for ``response``, scored in one forward (``per_step`` False) or
    token by token as Captum's ``forward_in_tokens``, after the untouched
    prefix computed once (``reuse_prefix``); ``draws`` seeds the baselines a
    Captum input draws for each coalition."""
    value_fn, adapter = attribution.value_fn, attribution.adapter
    if isinstance(inp, ChatInput):
        state = value_fn.prepare(adapter, inp.to_model_input(), response, per_step, reuse_prefix)

        def evaluate_chat(coalitions: Tensor) -> TargetValues:
            return value_fn.evaluate(adapter, inp.to_model_input(coalitions), response, state)

        n_columns = value_fn.n_columns(response)
        kind = "tokens" if value_fn.per_token else "samples" if n_columns > 1 else "total"

        prefix = getattr(state, "prefix", None)

        def row_length(coalitions: Tensor) -> Tensor:
            return adapter.pushed_lengths(inp.to_model_input(coalitions), prefix)

        return ValueGame(evaluate_chat, n_columns, kind, row_length=row_length)
    text = not isinstance(inp, ImageMaskInput)
    if not isinstance(value_fn, LogProbTarget) and not (
        text and isinstance(value_fn, ContrastiveTarget)
    ):
        raise UnsupportedInputError(
            "Captum's inputs support the log-prob target only (and, for text inputs, "
            "ContrastiveTarget)"
        )
    n_columns = value_fn.n_columns(response)
    if isinstance(inp, ImageMaskInput):
        forward = captum_compat.stock_image_forward(attribution, inp, per_step)
        calls = [0]

        def evaluate_image(coalitions: Tensor) -> TargetValues:
            # Processor inputs are model-specific: one coalition at a time.
            rows = [forward(c[None], response.ids) for c in coalitions]
            calls[0] += len(coalitions) * (len(response) if per_step else 1)
            return TargetValues(torch.stack(rows), "tokens")

        return ValueGame(evaluate_image, n_columns, "tokens", calls)
    score_rows = captum_compat.text_scorer(adapter)
    foil = (
        value_fn.foil_response(adapter, response)
        if isinstance(value_fn, ContrastiveTarget)
        else None
    )

    def evaluate_text(coalitions: Tensor) -> TargetValues:
        rows = [
            captum_compat.coalition_ids(attribution, inp, c[None], draws.of(c) if draws else None)
            for c in coalitions
        ]
        log_probs = score_rows(rows, response, None, per_step)
        if foil is not None:
            return ContrastiveTarget.values(log_probs, score_rows(rows, foil, None, per_step))
        assert isinstance(value_fn, LogProbTarget)
        return TargetValues(value_fn.from_log_probs(log_probs), "tokens")

    return ValueGame(evaluate_text, n_columns, "total" if foil is not None else "tokens")


def inspected(
    attribution: MultimodalLLMAttribution,
    game: ValueGame,
    inp: InterpretableInput,
    response: Response,
    inspect: Callable[..., None],
    draws: BaselineDraws | None = None,
) -> Callable[[Tensor], TargetValues]:
    """Captum's ``_inspect_forward`` hook around the game: called with (the
    coalition's prompt text, the response text, its probabilities as Captum
    gives them: the total, then each token's when attributed per token) for
    each coalition evaluated, each distinct one once."""
    value_fn = attribution.value_fn
    as_probs = isinstance(value_fn, LogProbTarget) and value_fn.kind == "log_prob"

    def prompt(coalition: Tensor) -> str:
        if isinstance(inp, ChatInput):
            ids = inp.to_model_input(coalition[None]).rows()[0]
            return str(attribution.tokenizer.decode(ids[ids >= 0]))  # the text positions
        seed = draws.of(coalition) if draws else None
        ids = captum_compat.coalition_ids(attribution, inp, coalition[None], seed)
        return str(attribution.tokenizer.decode(ids))

    def evaluate(coalitions: Tensor) -> TargetValues:
        out = game.evaluate(coalitions)
        values = out.values.detach().float().cpu()
        values = values.exp() if as_probs else values
        for coalition, row in zip(coalitions, values, strict=True):
            shown = row.tolist() if attribution.include_per_token_attr else float(row[0])
            inspect(prompt(coalition), response.text, shown)
        return out

    return evaluate
