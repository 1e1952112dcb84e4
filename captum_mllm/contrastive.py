"""A contrastive value function: why this answer rather than another.

"Why Paris?" is answered by everything that makes any capital likely; "why
Paris rather than Lyon?" by what tells the two apart (Yin & Neubig,
"Interpreting Language Models with Contrastive Explanations", EMNLP 2022;
Inseq's ``contrast_targets``). A coalition's value is the answer's
log-probability less the foil's, both teacher-forced after the same coalition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_mllm.answers import check_positions
from captum_mllm.chat import Chat
from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import InvalidContentError, TargetError
from captum_mllm.models.base import ModelAdapter, Response
from captum_mllm.targets import Target, TargetValues


@dataclass(frozen=True)
class _ContrastState:
    foil: Response
    prefix: Any
    per_step: bool


class ContrastiveTarget(Target):
    """The explained answer's log-probability less a foil's: positive
    attributions are features that make the model say the answer rather than
    the foil, negative ones features that pull towards the foil.

    Both are scored after the same coalition, in the same batch, so one
    explanation costs two teacher-forced passes a batch and no generation.
    Shapley values are linear in the value function: the result is the
    answer's attributions less the foil's, on the same coalitions (a sampler's
    error is that of the difference, not of two estimates). Sequence-level
    only (``token_attr`` is None): the answer and the foil have tokens of their
    own.

    Args:
        foil (str or Tensor): the other answer, as text (tokenized as the
            explained answer is: after the template's spaces where a given
            answer has them, else alone, as ``target=`` text is; so too with
            Captum's text inputs) or as token ids ``(T,)``.

    Examples::

        >>> attr = MultimodalLLMAttribution(
        ...     ExactShapleyValues(model), model, target=ContrastiveTarget("Lyon"))
        >>> res = attr.attribute(inp, target="Paris")  # why Paris rather than Lyon
    """

    def __init__(self, foil: str | Tensor) -> None:
        if isinstance(foil, str):
            if not foil.strip():
                raise TargetError("the foil is empty or only white space; give the other answer")
        elif not isinstance(foil, Tensor):
            raise TargetError(f"the foil must be a str or a Tensor, got {type(foil).__name__}")
        self.foil = foil

    def n_columns(self, response: Response) -> int:
        """One column: the difference of the two log-probabilities."""
        return 1

    def prepare(
        self,
        model: ModelAdapter,
        full: MaskedChat,
        response: Response,
        per_step: bool = False,
        reuse_prefix: bool = True,
    ) -> _ContrastState:
        """The foil as the model's tokens, and the untouched prefix run once."""
        foil = self.foil_response(model, response, full.encoded)
        check_positions(model, len(full.encoded), len(foil))  # a learned table's IndexError
        prefix = model.prefill(full) if reuse_prefix else None
        return _ContrastState(foil, prefix, per_step)

    def foil_response(
        self, model: ModelAdapter, response: Response, encoded: EncodedChat | None = None
    ) -> Response:
        """The foil as the model reads it after ``encoded``'s prompt (without
        one, as Captum's text inputs: alone, as their ``target=`` text),
        checked against the explained ``response``."""
        if isinstance(self.foil, Tensor):
            foil = model.check_target(self.foil)
            return self._checked(foil, response)
        try:  # as an answer's text: "<|im_end|>" would be read as the end token
            model.check_text(Chat().assistant(self.foil))
        except InvalidContentError as exc:
            raise InvalidContentError(
                f"the foil: {exc}; to weigh the answer against a control token, give its ids"
            ) from None
        if encoded is not None:
            foil = model.answer_response(encoded, self.foil)
        else:
            foil = model.text_response(self.foil)
        return self._checked(foil, response)

    def _checked(self, foil: Response, response: Response) -> Response:
        if len(foil) == 0:
            raise TargetError(f"the foil {self.foil!r} has no tokens")
        if torch.equal(foil.ids, response.ids):
            raise TargetError(
                f"the foil {foil.text!r} is the explained answer itself: every value would "
                "be 0; give the other answer the model might have said"
            )
        return foil

    def evaluate(
        self, model: ModelAdapter, masked: MaskedChat, response: Response, state: Any
    ) -> TargetValues:
        """``(B, 1)``: log p(answer) - log p(foil) under each coalition."""
        if state is None:
            state = self.prepare(model, masked, response, reuse_prefix=False)
        answer = model.score_masked(masked, response, state.prefix, state.per_step)
        foil = model.score_masked(masked, state.foil, state.prefix, state.per_step)
        return self.values(answer, foil)

    @staticmethod
    def values(answer: Tensor, foil: Tensor) -> TargetValues:
        """Token log-probabilities ``(B, T)`` of the answer and ``(B, T')`` of
        the foil -> ``(B, 1)`` their totals' difference."""
        return TargetValues((answer.sum(dim=1) - foil.sum(dim=1)).unsqueeze(1), "total")

    def settings(self) -> dict[str, Any]:
        foil = self.foil if isinstance(self.foil, str) else self.foil.reshape(-1).tolist()
        return {"foil": foil}
