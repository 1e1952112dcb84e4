"""The result of an explanation: Captum's ``LLMAttributionResult`` and more."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from captum.attr import InterpretableInput, LLMAttributionResult
from torch import Tensor

from captum_mllm.audio import ClipRef
from captum_mllm.chat_features import FeatureInfo
from captum_mllm.errors import (
    CaptumMLLMError,
    InvalidOptionError,
    PlotError,
    ResultFormatError,
    is_int,
    require_int,
    require_real,
)
from captum_mllm.saved_results import (
    RESULT_FILE,
    read_saved,
    result_file,
    saved_fields,
    to_saved,
    write_saved,
)


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
    """Attributions of a chat's features to a response: plain data.

    Everything Captum's ``LLMAttributionResult`` has (``seq_attr``,
    ``token_attr``, ``input_tokens``, ``output_tokens``, ``plot_token_attr``,
    ``plot_seq_attr``, ``plot_image_heatmap``) plus what each feature is, what
    was said, and how it was computed. It holds no model or input object
    (except Captum's own ``ImageMaskInput``, which ``plot_image_heatmap``
    reads), so it can be saved, reopened and sent to another process.

    Attributes:
        features (list of FeatureInfo or None): label, modality, turn, role,
            positions, clip and time span of each feature (None for Captum's
            own inputs).
        target_ids (Tensor or None): the explained response in the adapter's
            layout (``(T,)`` token ids; ``(N, 9)`` items for LFM2-Audio).
        response_text (str or None): the explained response as text.
        seq_attr_std (Tensor or None): with a sampled value function, the sample
            standard deviation of each feature's attribution over the samples.
        seq_attr_stderr (Tensor or None): with captum-mllm's estimators
            (:mod:`captum_mllm.methods`), the standard error of each feature's
            estimate (zeros for exact methods).
        token_attr_stderr (Tensor or None): the same per output token.
        responses (dict or None): for regenerating value functions, the answer
            (text, or list of sampled texts) under each evaluated coalition,
            keyed by the coalition as a tuple of 0/1.
        roles (list of str or None): the role of each turn of the chat.
        segments (list of dict or None): the chat's text, turn by turn, split
            into runs of one feature or of fixed text (see ``ChatInput.segments``).
        clips (list of ClipRef or None): the chat's audio clips, in chat order.
        output_audio (dict or None): for spoken responses, ``{"codes": (8, F)
            Mimi codes, "waveform": 24 kHz samples or None (needs the model's
            detokenizer or Mimi weights), "sample_rate": 24000}``.
        provenance (dict): model, method and its arguments, target settings,
            the ``ChatInput``'s settings (``"input_settings"``: roles, units,
            skips, baselines), seed, package versions.
        n_model_calls (int): model forwards (and generate calls) made.
        n_coalitions (int): coalitions the Captum method asked for.
        n_unique_coalitions (int): coalitions evaluated in this call.
        n_stored_coalitions (int): coalitions read from the store of an earlier run.
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
        response_text: str | None = None,
        seq_attr_std: Tensor | None = None,
        seq_attr_stderr: Tensor | None = None,
        token_attr_stderr: Tensor | None = None,
        responses: dict[tuple[int, ...], Any] | None = None,
        roles: list[str] | None = None,
        segments: list[dict[str, Any]] | None = None,
        clips: list[ClipRef] | None = None,
        output_audio: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        n_model_calls: int = 0,
        n_coalitions: int = 0,
        n_unique_coalitions: int = 0,
        n_stored_coalitions: int = 0,
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
        self.response_text = response_text
        self.seq_attr_std = seq_attr_std
        self.seq_attr_stderr = seq_attr_stderr
        self.token_attr_stderr = token_attr_stderr
        self.responses = responses
        self.roles = roles
        self.segments = segments
        self.clips = clips
        self.output_audio = output_audio
        self.provenance = dict(provenance or {})
        self.n_model_calls = n_model_calls
        self.n_coalitions = n_coalitions
        self.n_unique_coalitions = n_unique_coalitions
        self.n_stored_coalitions = n_stored_coalitions
        self.wall_time = wall_time

    # Saving and loading ---------------------------------------------------------------

    def to_dict(self, embed_audio: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The result as JSON-able data plus named arrays.

        Args:
            embed_audio (bool, optional): keep clip samples in the arrays; when
                False a clip read from a file keeps only its path. Default: True

        Returns:
            tuple: ``(data, arrays)``: what :meth:`save` writes as JSON and ``.npz``.
        """
        return to_saved(self, embed_audio)

    def save(self, path: str | PathLike[str], embed_audio: bool = True) -> Path:
        """Write the result as ``path`` (JSON) and the arrays beside it
        (``path`` with suffix ``.npz``); no pickle.

        Args:
            path (str or PathLike): e.g. ``"explanation.json"``; a folder that
                exists gets ``result.json`` (as :meth:`load` reads a folder).
            embed_audio (bool, optional): see :meth:`to_dict`. Default: True

        Returns:
            Path: the JSON file.

        Examples::

            >>> res.save("explanation.json")
            >>> again = MultimodalLLMAttributionResult.load("explanation.json")
        """
        path = Path(path)
        if path.is_dir():  # the JSON was renamed onto the folder: Errno 21, files beside it
            path = path / RESULT_FILE
        if path.suffix == ".npz":  # the JSON would overwrite the arrays
            raise InvalidOptionError(
                f"save the result as a .json path (its arrays go beside it as .npz), got {path}"
            )
        write_saved(path, *self.to_dict(embed_audio))
        return path

    @classmethod
    def load(cls, path: str | PathLike[str]) -> MultimodalLLMAttributionResult:
        """Read a result written by :meth:`save`.

        Warns (:class:`~captum_mllm.errors.InconsistentVersionWarning`) when it
        was saved by another version of captum-mllm.

        Args:
            path (str or PathLike): the JSON file, or a folder holding
                ``result.json`` (``captum-mllm explain --out`` writes one, and
                :func:`~captum_mllm.explain_dataset` one a chat).

        Raises:
            ResultFormatError: a file is missing, cut short or of another schema.
        """
        path = result_file(Path(path))
        data, arrays = read_saved(path)
        try:  # a hand-edited or cut file: a KeyError named only the key
            return cls(**saved_fields(data, arrays))
        except (KeyError, TypeError, ValueError) as exc:
            raise ResultFormatError(
                f"{path} (with its .npz) is not a whole saved result: {type(exc).__name__} {exc}"
            ) from exc

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

        A constant or all-zero vector becomes zeros (never NaN). Standard errors
        and deviations are dropped (None) unless ``kind`` is ``"identity"``:
        they are in the units of the values before.

        Args:
            kind (str, optional): one of the above. Default: ``"abs_sum"``
            power (float, optional): exponent of ``"power_shift"``, above 0. Default: 2.0

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
        if kind == "power_shift":  # 0 ** p for the smallest value: NaN below 0, uniform at 0
            require_real("power", power, above=0)
        fn = _NORMALISERS[kind]
        new = copy.copy(self)
        new.seq_attr = fn(self.seq_attr[None], power)[0]
        if self.token_attr is not None:
            new.token_attr = fn(self.token_attr, power)
        if kind != "identity":  # the old units' errors beside new values would mislead
            new.seq_attr_std = new.seq_attr_stderr = new.token_attr_stderr = None
        return new

    def plot_audio_attr(
        self,
        turn: int | None = None,
        clip: int = 0,
        target_token_pos: int | tuple[int, int] | None = None,
        show: bool = False,
        figsize: tuple[float, float] | None = None,
    ) -> tuple[Any, Any] | None:
        """Draw a clip's waveform above its log-mel spectrogram, each audio
        feature's span shaded with its attribution in Captum's red-white-green
        scale centred on 0 (the colours of ``plot_token_attr``), labelled with its
        aligned word or time span, with a colour bar, titled with what is
        attributed (the answer, or its output tokens).

        Args:
            turn (int, optional): the chat turn whose clip to draw; None counts
                clips over the whole chat. Default: None
            clip (int, optional): which clip (of the turn, or of the chat). Default: 0
            target_token_pos (int or tuple[int, int], optional): None draws the
                sequence attribution, an int that output token's row of
                ``token_attr``, ``(m, n)`` rows m..n-1 summed. Default: None
            show (bool, optional): show the figure instead of returning it. Default: False
            figsize (tuple, optional): Default: 3 inches a second, between 8 and
                16 inches wide; a long clip labels only the spans with the largest
                attributions that fit.

        Returns:
            None or tuple[Figure, tuple[Axes, Axes]]: ``(fig, (waveform, spectrogram))``.

        Examples::

            >>> fig, (ax_wave, ax_mel) = res.plot_audio_attr(turn=1)
            >>> res.plot_audio_attr(target_token_pos=(0, 3), show=True)
        """
        from captum_mllm.viz.audio import plot_audio_attr

        return plot_audio_attr(self, turn, clip, target_token_pos, show, figsize)

    def plot_chat_attr(
        self,
        target_token_pos: int | tuple[int, int] | None = None,
        width: int = 80,
        figsize: tuple[float, float] | None = None,
        show: bool = False,
    ) -> tuple[Any, Any] | None:
        """The whole conversation, turn by turn: text features as coloured boxes
        behind their words, audio features as coloured strips on their clip's
        time axis, fixed text grey (Captum's red-white-green scale centred on 0),
        titled with what is attributed (the answer, or its output tokens).

        Args:
            target_token_pos (int or tuple[int, int], optional): as in
                :meth:`plot_audio_attr`. Default: None (sequence attribution)
            width (int, optional): characters per line. Default: 80
            figsize (tuple, optional): Default: from the width and the chat's length
            show (bool, optional): show instead of returning. Default: False

        Returns:
            None or tuple[Figure, Axes]

        Examples::

            >>> fig, ax = res.plot_chat_attr(target_token_pos=0)
        """
        from captum_mllm.viz.chat import plot_chat_attr

        return plot_chat_attr(self, target_token_pos, width, figsize, show)

    def plot_token_attr(
        self, show: bool = False, figsize: tuple[float, float] | None = None
    ) -> Any:
        """Captum's heatmap at a sane size (at most 20 x 12 inches unless
        ``figsize`` says otherwise), x labels upright, every k-th label when not
        all fit, and cell values shrunk to their cells (left out below 5 points)."""
        if self.token_attr is None:  # Captum's own ValueError, as our other plots' PlotError
            raise PlotError(
                "this result has no token_attr (Lime, KernelShap and sequence-level targets "
                "attribute the whole answer): use plot_seq_attr"
            )
        from captum_mllm.viz.heatmap import token_heatmap

        return self._fitted(token_heatmap(self), show, figsize, heatmap=True)

    def plot_seq_attr(self, show: bool = False, figsize: tuple[float, float] | None = None) -> Any:
        """Captum's bar plot, sized and labelled as :meth:`plot_token_attr`, with
        each bar's standard error where an estimator gave one (none where it is
        infinite: the coalitions drawn show no spread; none at all when every
        one is 0, as an exact method's)."""
        fig, ax = super().plot_seq_attr(show=False)
        given = self.seq_attr_stderr
        stderr = torch.as_tensor([] if given is None else given).detach().cpu().double()
        if stderr.isfinite().logical_and(stderr > 0).any():  # exact methods report 0s
            ax.errorbar(
                range(len(stderr)),
                self.seq_attr.detach().cpu().double().numpy(),
                yerr=stderr.where(stderr.isfinite(), float("nan")).numpy(),
                fmt="none", ecolor="black", elinewidth=1, capsize=2, label="± standard error",
            )  # fmt: skip
            ax.legend(loc="best", fontsize=8)
        return self._fitted((fig, ax), show, figsize)

    def _fitted(
        self, fig_ax: Any, show: bool, figsize: tuple[float, float] | None, heatmap: bool = False
    ) -> Any:
        from captum_mllm.viz.fonts import glyph_warnings_muted
        from captum_mllm.viz.labels import fit_heatmap, fit_margins, fit_tick_labels
        from captum_mllm.viz.text import as_written

        fig, ax = fig_ax
        # Captum's labels before its textwrap.shorten, which cuts at spaces only:
        # a long label without any (a Chinese sentence, a URL) was "..." alone
        ax.set_xticks(ax.get_xticks(), [repr(t)[1:-1] for t in self.input_tokens])
        as_written(fig)  # before fitting: what is drawn sizes the labels
        width, height = fig.get_size_inches()
        fig.set_size_inches(*(figsize or (min(width, 20.0), min(height, 12.0))))
        # Twice: the margins the labels need change the room they are fitted to.
        with glyph_warnings_muted():  # measuring draws: as_written named them once
            for _ in range(2):
                fit_tick_labels(fig, ax)
                if heatmap:
                    fit_heatmap(fig, ax)
                fit_margins(fig)
        if show:
            import matplotlib.pyplot as plt

            plt.show()
            return None
        return fig, ax

    @property
    def foil(self) -> str | list[int] | None:
        """The other answer a :class:`~captum_mllm.ContrastiveTarget` weighed
        the answer against (its text, or its token ids), else None."""
        return (self.provenance.get("target") or {}).get("foil")

    @property
    def seq_attr_dict(self) -> dict[str, float]:
        """Each feature's attribution by its label, as Captum's, except that a
        label several features hold (a word said twice) names each of them:
        ``"the"``, ``"the (2)"``, ... (Captum's dict keeps only the last one's
        value, and has fewer entries than features)."""
        out: dict[str, float] = {}
        for label, value in zip(self.input_tokens, self.seq_attr.cpu().tolist(), strict=True):
            key, count = label, 1
            while key in out:
                count += 1
                key = f"{label} ({count})"
            out[key] = value
        return out

    def to_dataframe(self, per_token: bool = True) -> pd.DataFrame:
        """One row per feature: label, modality, turn, role, sequence attribution,
        then one column per output token (when token attributions exist).

        Args:
            per_token (bool, optional): add the output tokens' columns. Default: True

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
            table["start_s"] = [f.time[0] if f.time else None for f in self.features]
            table["end_s"] = [f.time[1] if f.time else None for f in self.features]
        table["seq_attr"] = self.seq_attr.detach().cpu().float().numpy()
        if self.seq_attr_stderr is not None:
            table["seq_attr_stderr"] = torch.as_tensor(self.seq_attr_stderr).cpu().float().numpy()
        frame = pd.DataFrame(table)
        if per_token and self.token_attr is not None:
            values = self.token_attr.detach().cpu().float().numpy().T
            columns = [f"{i}:{t}" for i, t in enumerate(self.output_tokens)]
            frame = pd.concat([frame, pd.DataFrame(values, columns=columns)], axis=1)
        return frame

    # Summaries ----------------------------------------------------------------------

    def modality_share(
        self, target_token_pos: int | tuple[int, int] | None = None
    ) -> dict[str, float]:
        """Share of the total absolute attribution held by each modality (text,
        audio_in, mixed), as MM-SHAP reports it; the shares sum to 1, or are
        NaN when every attribution is zero (no modality holds a share then).

        Args:
            target_token_pos (int or tuple[int, int], optional): one output
                token's row of ``token_attr`` instead of the sequence attribution,
                or ``(m, n)`` for rows m..n-1 summed. Default: None
        """
        values = self._row(target_token_pos).abs()
        kinds = [f.modality for f in self.features] if self.features else ["text"] * len(values)
        total = float(values.sum())
        shares: dict[str, float] = {}
        for kind, value in zip(kinds, values.tolist(), strict=True):
            shares[kind] = shares.get(kind, 0.0) + value
        if total == 0:  # an even split would claim both modalities matter alike
            return {k: math.nan for k in shares}
        return {k: v / total for k, v in shares.items()}

    def by_turn(self) -> pd.DataFrame:
        """Sequence attribution summed per turn (with its role); ``groups=`` across
        turns are a row of their own, turn -1 (role ``"mixed"`` unless shared)."""
        frame = self.to_dataframe()
        if "turn" not in frame:
            raise InvalidOptionError("this result has no turns (a Captum input): use to_dataframe")
        return pd.DataFrame(frame.groupby(["turn", "role"], as_index=False)["seq_attr"].sum())

    def by_role(self) -> pd.DataFrame:
        """Sequence attribution summed per role."""
        return pd.DataFrame(self.by_turn().groupby("role", as_index=False)["seq_attr"].sum())

    def top_features(self, k: int = 5, by_abs: bool = True) -> pd.DataFrame:
        """The ``k`` features with the largest (absolute) sequence attributions."""
        require_int("k", k, 0)
        frame = self.to_dataframe()
        key = frame["seq_attr"].abs() if by_abs else frame["seq_attr"]
        return frame.loc[key.sort_values(ascending=False).index[:k]]

    def _what(self, target_token_pos: int | tuple[int, int] | None) -> str:
        """What :meth:`_row` attributes, in words: the answer, or its output
        token(s) at ``target_token_pos`` (a title for the plots)."""
        from captum_mllm.viz.labels import shortened

        if target_token_pos is None:
            answer = self.response_text or " ".join(self.output_tokens)
            rather = (
                ""
                if self.foil is None
                else f" rather than {shortened(str(self.foil), 70, '...')!r}"
            )
            return f"the answer {shortened(answer, 70, '...')!r}{rather}"
        if isinstance(target_token_pos, tuple | list):
            m, n = (int(i) for i in target_token_pos)
            tokens = " ".join(self.output_tokens[m:n])
            return f"output tokens {m}-{n - 1}: {shortened(tokens, 70, '...')!r}"
        i = int(target_token_pos)
        return f"output token {i % len(self.output_tokens)}: {self.output_tokens[i]!r}"

    def _row(
        self,
        target_token_pos: int | tuple[int, int] | None,
        error: type[CaptumMLLMError] = InvalidOptionError,
    ) -> Tensor:
        """The sequence attribution, one output token's row of ``token_attr``, or
        rows m..n-1 summed for ``(m, n)`` (as Captum's ``plot_image_heatmap``)."""
        if target_token_pos is None:
            return torch.as_tensor(self.seq_attr).detach().cpu().float()
        if self.token_attr is None:
            raise error("this result has no token_attr; use target_token_pos=None")
        rows = len(self.token_attr)
        token_attr = torch.as_tensor(self.token_attr).detach().cpu().float()
        pos: Any = target_token_pos  # checked here: users pass numpy ints, bools, floats
        if is_int(pos) and -rows <= pos < rows:
            return token_attr[int(pos)]
        if (
            isinstance(pos, tuple | list)
            and len(pos) == 2
            and all(is_int(i) for i in pos)
            and 0 <= pos[0] < pos[1] <= rows
        ):  # a bool or float indexed another shape, or raised deep inside
            return token_attr[int(pos[0]) : int(pos[1])].sum(dim=0)
        raise error(
            f"target_token_pos {pos!r} is out of range: use an int in [{-rows}, {rows}) "
            f"or (m, n) with 0 <= m < n <= {rows}"
        )

    # Reports ------------------------------------------------------------------------

    def to_html(self) -> str:
        """The explanation as one self-contained HTML page (no network): the
        chat with its features coloured, audio clips playable segment by segment,
        a selector over output tokens, the response and the provenance.

        Examples::

            >>> res.save_html("explanation.html")
        """
        from captum_mllm.viz.report import render_report

        return render_report(self)

    def save_html(self, path: str | PathLike[str]) -> Path:
        """Write :meth:`to_html` to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        from captum_mllm.viz.report import framed

        top = self.top_features(5)
        pairs = zip(top["feature"], top["seq_attr"], strict=True)
        largest = ", ".join(f"{f} {v:+.3g}" for f, v in pairs)
        caption = f"Attribution to {self._what(None)}; largest: {largest}"
        return framed(self.to_html(), caption)  # a page of its own inside the notebook's

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(features={len(self.input_tokens)}, "
            f"output_tokens={len(self.output_tokens)}, model_calls={self.n_model_calls}, "
            f"unique_coalitions={self.n_unique_coalitions}/{self.n_coalitions})"
        )
