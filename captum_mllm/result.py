"""The result of an explanation: Captum's ``LLMAttributionResult`` and more."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy.typing as npt
import pandas as pd
import torch
from captum.attr import InterpretableInput, LLMAttributionResult
from torch import Tensor

from captum_mllm.errors import InvalidOptionError
from captum_mllm.inputs import FeatureInfo


def _safe_divide(x: Tensor, d: Tensor) -> Tensor:
    return torch.where(d > 0, x / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(x))


def _shifted(x: Tensor) -> Tensor:
    return x - x.min(dim=-1, keepdim=True).values


# Row-wise normalisers: (R, n) -> (R, n).
_NORMALISERS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "identity": lambda x, p: x.clone(),
    "abs_sum": lambda x, p: _safe_divide(x, x.abs().sum(-1, keepdim=True)),
    "min_max": lambda x, p: _safe_divide(_shifted(x), _shifted(x).max(-1, keepdim=True).values),
    "power_shift": lambda x, p: _safe_divide(
        _shifted(x) ** p, (_shifted(x) ** p).sum(-1, keepdim=True)
    ),
}


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
        seq_attr_std (Tensor or None): with a sampled value function, the sample
            standard deviation of each feature's attribution over the samples.
        responses (dict or None): for regenerating value functions, the answer
            (text, or list of sampled texts) under each evaluated coalition,
            keyed by the coalition as a tuple of 0/1.
        n_model_calls (int): model forwards (and generate calls) made.
        n_coalitions (int): coalitions the Captum method asked for.
        n_unique_coalitions (int): coalitions actually evaluated (cache misses).
        wall_time (float): seconds spent in ``attribute``.
        output_audio (dict or None): for spoken responses, ``{"codes": (8, F)
            Mimi codes, "waveform": 24 kHz samples or None (needs the model's
            detokenizer weights), "sample_rate": 24000}``.
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
        seq_attr_std: Tensor | None = None,
        responses: dict[tuple[int, ...], Any] | None = None,
        n_model_calls: int = 0,
        n_coalitions: int = 0,
        n_unique_coalitions: int = 0,
        wall_time: float = 0.0,
        output_audio: dict[str, Any] | None = None,
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
        self.seq_attr_std = seq_attr_std
        self.responses = responses
        self.n_model_calls = n_model_calls
        self.n_coalitions = n_coalitions
        self.n_unique_coalitions = n_unique_coalitions
        self.wall_time = wall_time
        self.output_audio = output_audio

    def normalized(
        self, kind: str = "abs_sum", power: float = 2.0
    ) -> MultimodalLLMAttributionResult:
        """A copy with normalised attributions; this result stays untouched.

        Each vector (``seq_attr``, and each row of ``token_attr``) is normalised
        on its own:

        - ``"identity"``: unchanged;
        - ``"abs_sum"``: ``x / sum(|x|)`` (signs kept, absolute values sum to 1);
        - ``"min_max"``: ``(x - min) / (max - min)`` into [0, 1];
        - ``"power_shift"``: ``(x - min) ** power / sum((x - min) ** power)``, a
          distribution that sharpens the largest values as ``power`` grows.

        A constant or all-zero vector becomes zeros (never NaN).

        Args:
            kind (str, optional): one of the above. Default: ``"abs_sum"``
            power (float, optional): exponent of ``"power_shift"``. Default: 2.0

        Returns:
            MultimodalLLMAttributionResult: the normalised copy.

        Examples::

            >>> res.normalized("power_shift", power=2).seq_attr.sum()
            tensor(1.)
        """
        if kind not in _NORMALISERS:
            raise InvalidOptionError(
                f"unknown normaliser {kind!r}; use one of {sorted(_NORMALISERS)}"
            )
        fn = _NORMALISERS[kind]
        new = copy.copy(self)
        new.seq_attr = fn(self.seq_attr[None], power)[0]
        if self.token_attr is not None:
            new.token_attr = fn(self.token_attr, power)
        return new

    def plot_audio_attr(
        self,
        turn: int | None = None,
        clip: int = 0,
        target_token_pos: int | tuple[int, int] | None = None,
        show: bool = False,
    ) -> tuple[Any, Any] | None:
        """Draw a clip's waveform above its log-mel spectrogram, each audio
        feature's span shaded with its attribution in Captum's red-white-green
        scale centred on 0 (the colours of ``plot_token_attr``), labelled with its
        aligned word or time span, with a colour bar.

        Args:
            turn (int, optional): the chat turn whose clip to draw; None counts
                clips over the whole chat. Default: None
            clip (int, optional): which clip (of the turn, or of the chat). Default: 0
            target_token_pos (int or tuple[int, int], optional): None draws the
                sequence attribution, an int that output token's row of
                ``token_attr``, ``(m, n)`` rows m..n-1 summed. Default: None
            show (bool, optional): show the figure instead of returning it. Default: False

        Returns:
            None or tuple[Figure, tuple[Axes, Axes]]: ``(fig, (waveform, spectrogram))``.

        Examples::

            >>> fig, (ax_wave, ax_mel) = res.plot_audio_attr(turn=1)
            >>> res.plot_audio_attr(target_token_pos=(0, 3), show=True)
        """
        from captum_mllm.viz.audio import plot_audio_attr

        return plot_audio_attr(self, turn, clip, target_token_pos, show)

    def plot_token_attr(self, show: bool = False) -> Any:
        """Captum's heatmap, with x labels kept apart for many or long feature labels."""
        return self._fitted(super().plot_token_attr(show=False), show)

    def plot_seq_attr(self, show: bool = False) -> Any:
        """Captum's bar plot, with x labels kept apart for many or long feature labels."""
        return self._fitted(super().plot_seq_attr(show=False), show)

    def _fitted(self, fig_ax: Any, show: bool) -> Any:
        from captum_mllm.viz.labels import fit_tick_labels

        fig, ax = fig_ax
        fit_tick_labels(fig, ax)
        if show:
            import matplotlib.pyplot as plt

            plt.show()
            return None
        return fig, ax

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
