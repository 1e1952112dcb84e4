"""The result of an explanation: Captum's ``LLMAttributionResult`` and more."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy.typing as npt
import pandas as pd
from captum.attr import InterpretableInput, LLMAttributionResult
from torch import Tensor

from captum_mllm.inputs import FeatureInfo


class MultimodalLLMAttributionResult(LLMAttributionResult):
    """Attributions of a chat's features to a response.

    Everything Captum's ``LLMAttributionResult`` has (``seq_attr``,
    ``token_attr``, ``input_tokens``, ``output_tokens``, ``plot_token_attr``,
    ``plot_seq_attr``, ``plot_image_heatmap``) plus what each feature is and
    what the explanation cost.

    Attributes:
        features (list of FeatureInfo or None): modality, turn, role and
            positions of each feature (None for Captum's own inputs).
        target_ids (Tensor or None): ``(T,)`` ids of the explained response.
        n_model_calls (int): model forwards (and generate calls) made.
        n_coalitions (int): coalitions the Captum method asked for.
        n_unique_coalitions (int): coalitions actually evaluated (cache misses).
        wall_time (float): seconds spent in ``attribute``.
    """

    def __init__(
        self,
        *,
        input_tokens: list[str],
        output_tokens: list[str],
        seq_attr: npt.ArrayLike,
        token_attr: npt.ArrayLike | None = None,
        output_probs: npt.ArrayLike | None = None,
        inp: InterpretableInput | None = None,
        features: Sequence[FeatureInfo] | None = None,
        target_ids: Tensor | None = None,
        n_model_calls: int = 0,
        n_coalitions: int = 0,
        n_unique_coalitions: int = 0,
        wall_time: float = 0.0,
    ) -> None:
        super().__init__(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            seq_attr=seq_attr,
            token_attr=token_attr,
            output_probs=output_probs,
            inp=inp,
        )
        self.features = list(features) if features is not None else None
        self.target_ids = target_ids
        self.n_model_calls = n_model_calls
        self.n_coalitions = n_coalitions
        self.n_unique_coalitions = n_unique_coalitions
        self.wall_time = wall_time

    def to_dataframe(self) -> pd.DataFrame:
        """One row per feature: label, modality, turn, role, sequence attribution,
        then one column per output token (when token attributions exist).

        Returns:
            pandas.DataFrame: the table.

        Examples::

            >>> res.to_dataframe().sort_values("seq_attr").head()
        """
        table: dict[str, Any] = {"feature": self.input_tokens}
        if self.features is not None:
            table["modality"] = [f.modality for f in self.features]
            table["turn"] = [f.turn for f in self.features]
            table["role"] = [f.role for f in self.features]
        table["seq_attr"] = self.seq_attr.detach().cpu().float().numpy()
        frame = pd.DataFrame(table)
        if self.token_attr is not None:
            per_token = self.token_attr.detach().cpu().float().numpy().T
            columns = [f"{i}:{t}" for i, t in enumerate(self.output_tokens)]
            frame = pd.concat([frame, pd.DataFrame(per_token, columns=columns)], axis=1)
        return frame

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(features={len(self.input_tokens)}, "
            f"output_tokens={len(self.output_tokens)}, model_calls={self.n_model_calls}, "
            f"unique_coalitions={self.n_unique_coalitions}/{self.n_coalitions})"
        )
