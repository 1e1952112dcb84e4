"""Value functions: what a coalition of features is worth.

A target is called with a batch of B coalitions and returns ``(B, 1 + T)``
(the total, then one value per output token) or ``(B, 1)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_mllm.encoding import MaskedChat
from captum_mllm.errors import CaptumMLLMError


class LogProbTarget:
    """Teacher-forced log-probability (or probability) of the response.

    One batched forward scores every coalition of a batch; the first column is
    the whole response's log-probability, the others its tokens'.

    Args:
        kind (str, optional): ``"log_prob"`` or ``"prob"``. Default: ``"log_prob"``

    Examples::

        >>> prob = LogProbTarget("prob")
        >>> attr = MultimodalLLMAttribution(ShapleyValues(model), model, target=prob)
    """

    per_token = True

    def __init__(self, kind: str = "log_prob") -> None:
        if kind not in ("log_prob", "prob"):
            raise CaptumMLLMError(f"kind must be 'log_prob' or 'prob', got {kind!r}")
        self.kind = kind

    def __call__(
        self,
        model: Any,
        masked: MaskedChat,
        target_ids: Tensor,
        prefix: Any = None,
        per_step: bool = False,
    ) -> Tensor:
        """Score B coalitions.

        Args:
            model (ModelAdapter): the adapter.
            masked (MaskedChat): the coalitions applied to the chat.
            target_ids (Tensor): ``(T,)`` response token ids.
            prefix (Any, optional): the adapter's prefill state.
            per_step (bool, optional): one forward per response token.

        Returns:
            Tensor: ``(B, 1 + T)``.
        """
        return self.from_log_probs(model.score_masked(masked, target_ids, prefix, per_step))

    def from_log_probs(self, log_probs: Tensor) -> Tensor:
        """``(B, T)`` token log-probs -> ``(B, 1 + T)`` total then tokens."""
        out = torch.cat([log_probs.sum(dim=1, keepdim=True), log_probs], dim=1)
        return out.exp() if self.kind == "prob" else out

    def __repr__(self) -> str:
        return f"LogProbTarget({self.kind!r})"
