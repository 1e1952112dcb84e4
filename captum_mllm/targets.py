"""Value functions: what a coalition of features is worth.

A target is called with a batch of B coalitions and returns ``(B, 1 + T)``
(the total, then one value per output token) or ``(B, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import InvalidOptionError


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
            raise InvalidOptionError(f"kind must be 'log_prob' or 'prob', got {kind!r}")
        self.kind = kind

    def n_extra_outputs(self, n_target: int) -> int:
        """Columns after the total: one per target token."""
        return n_target

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


def _reduce(name: str) -> Callable[[Tensor], Tensor]:
    reducers: dict[str, Callable[[Tensor], Tensor]] = {
        "mean": lambda x: x.mean(0),
        "sum": lambda x: x.sum(0),
        "max": lambda x: x.max(0).values,
        "min": lambda x: x.min(0).values,
        "first": lambda x: x[0],
        "last": lambda x: x[-1],
    }
    if name not in reducers:
        raise InvalidOptionError(
            f"unknown reducer {name!r}; use one of {sorted(reducers)} or a callable"
        )
    return reducers[name]


def _similarity(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Similarities of rows of ``a`` (N, d) to one vector ``b`` (d,): (N,)."""
    sims: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "cosine": lambda a, b: torch.nn.functional.cosine_similarity(a, b[None], dim=1),
        "euclidean": lambda a, b: 1.0 / (1.0 + (a - b).norm(dim=1)),
        "negative_euclidean": lambda a, b: -(a - b).norm(dim=1),
        "dot": lambda a, b: a @ b,
        "manhattan": lambda a, b: 1.0 / (1.0 + (a - b).abs().sum(dim=1)),
    }
    if name not in sims:
        raise InvalidOptionError(
            f"unknown similarity {name!r}; use one of {sorted(sims)} or a callable"
        )
    return sims[name]


class EmbeddingSimilarity:
    """Regenerate the response under each coalition and compare it with the
    response to the full chat (the value function of MLLM-SHAP).

    Generation is batched across coalitions (left padding), greedy by default.
    Sequence-level only: ``token_attr`` is None for this target (with
    ``samples_per_coalition > 1`` the result's ``seq_attr_std`` holds the
    sample standard deviation of each feature's attribution over the samples).

    Args:
        embedding (str or callable, optional): ``"static"`` (the model's input
            embedding table), ``"contextual"`` (its last hidden states over the
            response), or a callable mapping a list of response texts to an
            ``(N, d)`` tensor (e.g. a sentence-transformers model's ``encode``).
            Default: ``"static"``
        context (str, optional): for ``"contextual"``: ``"response"`` encodes the
            response alone, ``"chat"`` after the full original chat. Default: ``"response"``
        reducer (str or callable, optional): tokens -> vector: ``"mean"``,
            ``"sum"``, ``"max"``, ``"min"``, ``"first"``, ``"last"``. Default: ``"mean"``
        similarity (str or callable, optional): ``"cosine"``, ``"euclidean"``
            (1 / (1 + d)), ``"negative_euclidean"``, ``"dot"``, ``"manhattan"``
            (1 / (1 + d)); a callable takes ``(N, d)`` and ``(d,)``. Default: ``"cosine"``
        gen_args (dict, optional): generation arguments, also used to generate the
            full response when ``target`` is None. Default: ``{"max_new_tokens": 25}``
        samples_per_coalition (int, optional): sampled responses per coalition;
            1 with ``temperature=None`` is greedy. Default: 1
        temperature (float, optional): text sampling temperature. Default: None
        top_k (int, optional): text top-k sampling. Default: None
        audio_temperature (float, optional): audio-frame sampling temperature
            (LFM2-Audio). Default: None
        audio_top_k (int, optional): audio-frame top-k sampling. Default: None
        seed (int, optional): seed of sampled generation. Default: 0
        empty_value (float, optional): value of an empty regenerated response and
            of zero-norm vectors. Default: 0.0

    Examples::

        >>> sim = EmbeddingSimilarity("contextual", reducer="mean", similarity="cosine")
        >>> attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model, target=sim)
        >>> res = attr.attribute(inp, n_samples=16, perturbations_per_eval=32)
        >>> res.responses[(0, 1, 1)]  # what the model said without the first feature
    """

    per_token = False

    def __init__(
        self,
        embedding: str | Callable[[list[str]], Tensor] = "static",
        context: str = "response",
        reducer: str | Callable[[Tensor], Tensor] = "mean",
        similarity: str | Callable[[Tensor, Tensor], Tensor] = "cosine",
        gen_args: dict[str, Any] | None = None,
        samples_per_coalition: int = 1,
        temperature: float | None = None,
        top_k: int | None = None,
        audio_temperature: float | None = None,
        audio_top_k: int | None = None,
        seed: int = 0,
        empty_value: float = 0.0,
    ) -> None:
        if isinstance(embedding, str) and embedding not in ("static", "contextual"):
            raise InvalidOptionError("embedding must be 'static', 'contextual' or a callable")
        if context not in ("response", "chat"):
            raise InvalidOptionError("context must be 'response' or 'chat'")
        if samples_per_coalition < 1:
            raise InvalidOptionError("samples_per_coalition must be at least 1")
        self.embedding = embedding
        self.context = context
        self.reducer = _reduce(reducer) if isinstance(reducer, str) else reducer
        self.similarity = _similarity(similarity) if isinstance(similarity, str) else similarity
        self.gen_args = {"max_new_tokens": 25, "do_sample": False, **(gen_args or {})}
        self.samples = samples_per_coalition
        audio = {"audio_temperature": audio_temperature, "audio_top_k": audio_top_k}
        self.sampled = samples_per_coalition > 1 or any(
            v is not None for v in (temperature, top_k, audio_temperature, audio_top_k)
        )
        if self.sampled:
            # Text is sampled when asked, or by default when several samples are
            # wanted and no modality was named; otherwise it stays greedy.
            named = any(v is not None for v in (temperature, top_k, *audio.values()))
            sample_text = temperature is not None or top_k is not None or not named
            self.gen_args.update(
                do_sample=True,
                temperature=(temperature or 1.0) if sample_text else None,
                top_k=top_k,
                **{k: v for k, v in audio.items() if v is not None},  # audio-output adapters
            )
        self.seed = seed
        self.empty_value = empty_value
        self.last_responses: list[Tensor] = []
        self._reference: tuple[Any, Tensor | None] | None = None
        self._n_calls = 0

    def n_extra_outputs(self, n_target: int) -> int:
        """Columns after the total: one per sample when sampling several."""
        return self.samples if self.samples > 1 else 0

    def __call__(
        self,
        model: Any,
        masked: MaskedChat,
        target_ids: Tensor,
        prefix: Any = None,
        per_step: bool = False,
    ) -> Tensor:
        """Regenerate, embed and compare B coalitions.

        Returns:
            Tensor: ``(B, 1)`` greedy, or ``(B, 1 + k)`` (mean, then each sample).
        """
        k = self.samples
        if k > 1:
            masked = replace(masked, present=masked.present.repeat_interleave(k, dim=0))
        if self.sampled:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + self._n_calls)
                self._n_calls += 1
                responses = model.generate_masked(masked, **self.gen_args)
        else:
            responses = model.generate_masked(masked, **self.gen_args)
        responses = [model.strip_response(r) for r in responses]
        self.last_responses = responses
        context = masked.encoded if self.context == "chat" else None
        reference = self._reference_vector(model, model.strip_response(target_ids), context)
        values = self.values(model, responses, reference, context).reshape(-1, k)
        if k == 1:
            return values
        return torch.cat([values.mean(dim=1, keepdim=True), values], dim=1)

    def values(
        self,
        model: Any,
        responses: list[Tensor],
        reference: Tensor | None,
        context: EncodedChat | None = None,
    ) -> Tensor:
        """Similarity of each response to the reference vector: ``(N,)``;
        ``empty_value`` for empty responses and zero-norm vectors."""
        out = torch.full((len(responses),), float(self.empty_value))
        vectors, ok = self.vectors(model, responses, context)
        if reference is None or not ok.any():
            return out
        sims = self.similarity(vectors[ok], reference).float().cpu()
        out[ok] = torch.nan_to_num(sims, nan=float(self.empty_value))
        return out

    def vectors(
        self, model: Any, responses: list[Tensor], context: EncodedChat | None = None
    ) -> tuple[Tensor, Tensor]:
        """Reduced vectors ``(N, d)`` and a mask of the usable ones (non-empty, non-zero)."""
        nonempty = [i for i, r in enumerate(responses) if len(r) > 0]
        if callable(self.embedding):
            texts = [model.decode_response(responses[i]) for i in nonempty]
            reduced = [v for v in torch.as_tensor(self.embedding(texts)).float()] if texts else []
        else:
            if self.embedding == "static":
                per_token = [model.token_embeddings(responses[i]) for i in nonempty]
            else:
                per_token = model.response_states([responses[i] for i in nonempty], context)
            reduced = [self.reducer(t.float()) for t in per_token]
        if not reduced:
            return torch.zeros(len(responses), 1), torch.zeros(len(responses), dtype=torch.bool)
        dim = reduced[0].shape[-1]
        vectors = torch.zeros(len(responses), dim)
        ok = torch.zeros(len(responses), dtype=torch.bool)
        for i, v in zip(nonempty, reduced, strict=True):
            vectors[i] = v.detach().cpu()
            ok[i] = bool(v.norm() > 0)
        return vectors, ok

    def _reference_vector(
        self, model: Any, target: Tensor, context: EncodedChat | None
    ) -> Tensor | None:
        key = (tuple(target.flatten().tolist()), id(context))
        if self._reference is None or self._reference[0] != key:
            vectors, ok = self.vectors(model, [target], context)
            self._reference = (key, vectors[0] if bool(ok[0]) else None)
        return self._reference[1]

    def __repr__(self) -> str:
        return f"EmbeddingSimilarity(embedding={self.embedding!r}, samples={self.samples})"
