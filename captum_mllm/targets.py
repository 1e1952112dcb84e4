"""Value functions: what a coalition of features is worth.

A :class:`Target` is pure: the value of a coalition depends on (chat,
coalition, the target's settings, its seed) only, never on the batch it is
evaluated in, on the order, or on earlier calls. Whatever an explanation
computes once (the prefix cache, the reference answer's vector) is made by
:meth:`Target.prepare` and handed back to :meth:`Target.evaluate`; the target
object itself keeps nothing between calls.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from captum_mllm.encoding import EncodedChat, MaskedChat, coalition_keys
from captum_mllm.errors import (
    InvalidOptionError,
    TargetError,
    require_int,
    require_real,
    warn_caller,
)
from captum_mllm.fingerprint import plain
from captum_mllm.models.base import ModelAdapter, Response
from captum_mllm.models.sampling import check_sampling


@dataclass(frozen=True)
class TargetValues:
    """The values of a batch of B coalitions.

    Attributes:
        values (Tensor): ``(B, k)``; column 0 is the value attributed at
            sequence level, the others its parts.
        columns (str): what columns 1.. are: ``"tokens"`` (one per output
            token, column 0 their sum), ``"samples"`` (one per sampled answer,
            column 0 their mean) or ``"total"`` (no further column).
        responses (list, optional): for regenerating targets, what the model
            said under each coalition: a text, or a list of texts when sampling.
    """

    values: Tensor
    columns: str
    responses: list[Any] | None = None


class Target(ABC):
    """Base class of value functions (abstract methods are enforced).

    Subclasses say how many value columns an explanation has, evaluate a
    batch of coalitions, and describe their settings (for the coalition store's
    fingerprint and the result's provenance).
    """

    #: Whether columns 1.. are per output token (Captum's ``token_attr``).
    per_token: bool = False
    #: Generation arguments for the answer to explain when no target is given.
    gen_args: dict[str, Any] | None = None

    def prepare(
        self,
        model: ModelAdapter,
        full: MaskedChat,
        response: Response,
        per_step: bool = False,
        reuse_prefix: bool = True,
    ) -> Any:
        """What one explanation computes once, before any coalition (default: nothing).

        Args:
            model (ModelAdapter): the adapter.
            full (MaskedChat): the chat with every feature present.
            response (Response): the answer being explained.
            per_step (bool, optional): score one output token per forward.
            reuse_prefix (bool, optional): compute the untouched prefix once.
        """
        return None

    @abstractmethod
    def n_columns(self, response: Response) -> int:
        """``k``: the columns :meth:`evaluate` returns for this response."""

    @abstractmethod
    def evaluate(
        self, model: ModelAdapter, masked: MaskedChat, response: Response, state: Any
    ) -> TargetValues:
        """Values of the B coalitions of ``masked``; ``state`` is :meth:`prepare`'s."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Every setting the values depend on, as plain JSON-able data."""

    def fingerprint(self) -> Any:
        """Plain data naming what the values depend on, for the coalition store
        (default: :meth:`settings`; a target holding callables adds what
        :func:`~captum_mllm.fingerprint.plain` reads of them)."""
        return self.settings()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def coalition_seed(seed: int, key: bytes, sample: int = 0) -> int:
    """A 63-bit seed for one coalition's ``sample``-th sampled answer, from
    (seed, the coalition's key): the same in any batch, order or call."""
    digest = hashlib.blake2b(key, digest_size=8, key=f"{seed}:{sample}".encode()).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class _LogProbState:
    prefix: Any
    per_step: bool


class LogProbTarget(Target):
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

    def n_columns(self, response: Response) -> int:
        """The total, then one column per output token."""
        return 1 + len(response)

    def prepare(
        self,
        model: ModelAdapter,
        full: MaskedChat,
        response: Response,
        per_step: bool = False,
        reuse_prefix: bool = True,
    ) -> _LogProbState:
        """Run the prefix no feature touches once (when ``reuse_prefix``)."""
        return _LogProbState(model.prefill(full) if reuse_prefix else None, per_step)

    def evaluate(
        self, model: ModelAdapter, masked: MaskedChat, response: Response, state: Any
    ) -> TargetValues:
        """Score B coalitions: ``(B, 1 + T)``, total then tokens."""
        state = state or _LogProbState(None, False)
        log_probs = model.score_masked(masked, response, state.prefix, state.per_step)
        return TargetValues(self.from_log_probs(log_probs), "tokens")

    def from_log_probs(self, log_probs: Tensor) -> Tensor:
        """``(B, T)`` token log-probs -> ``(B, 1 + T)`` total then tokens."""
        out = torch.cat([log_probs.sum(dim=1, keepdim=True), log_probs], dim=1)
        return out.exp() if self.kind == "prob" else out

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind}


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


def _sampling_setting(key: str, value: Any, gen_args: dict[str, Any], do_sample: Any) -> Any:
    """A sampling setting given as an argument or, the transformers way, in
    ``gen_args`` (taken out of it: sampled generation is seeded per
    coalition, so that a value never depends on the batch it was drawn in)."""
    given = gen_args.pop(key, None)
    if given is None:  # unset (as in Captum's default generation arguments)
        return value
    if do_sample is False:
        raise InvalidOptionError(f"gen_args sets {key} with do_sample=False")
    if value is not None and value != given:
        raise InvalidOptionError(f"{key} is given twice: {value!r} and {given!r} in gen_args")
    return given


class EmbeddingSimilarity(Target):
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
            ``"sum"``, ``"max"``, ``"min"``, ``"first"``, ``"last"`` (a callable
            ``embedding`` reduces on its own). Default: ``"mean"``
        similarity (str or callable, optional): ``"cosine"``, ``"euclidean"``
            (1 / (1 + d)), ``"negative_euclidean"``, ``"dot"``, ``"manhattan"``
            (1 / (1 + d)); a callable takes ``(N, d)`` and ``(d,)``. Default: ``"cosine"``
        gen_args (dict, optional): generation arguments, also used to generate the
            full response when ``target`` is None (greedy). Sampling settings
            (``do_sample``, ``temperature``, ``top_k``, ...) may be given here
            too, as to ``generate``: they mean what the arguments below mean.
            Default: ``{"max_new_tokens": 25}``
        samples_per_coalition (int, optional): sampled responses per coalition;
            1 with no sampling setting is greedy. Text settings not given are
            the model's (a Hugging Face model's generation config's, as
            ``model.generate(do_sample=True)`` reads them; LFM2-Audio's
            temperature 1 over every token). Default: 1
        temperature (float, optional): text sampling temperature (0: greedy, as
            in liquid-audio's sampler). Default: None
        top_k (int, optional): text top-k sampling (0: every token, as in
            transformers). Default: None
        top_p (float, optional): text nucleus sampling (Hugging Face models).
            Default: None
        min_p (float, optional): text min-p sampling: tokens at least this
            share of the most likely one's probability (Hugging Face models).
            Default: None
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
        top_p: float | None = None,
        min_p: float | None = None,
        audio_temperature: float | None = None,
        audio_top_k: int | None = None,
        seed: int = 0,
        empty_value: float = 0.0,
    ) -> None:
        if isinstance(embedding, str) and embedding not in ("static", "contextual"):
            raise InvalidOptionError("embedding must be 'static', 'contextual' or a callable")
        if context not in ("response", "chat"):
            raise InvalidOptionError("context must be 'response' or 'chat'")
        if context == "chat" and embedding != "contextual":  # it would go unread
            raise InvalidOptionError('context="chat" is only read with embedding="contextual"')
        if callable(embedding) and reducer != "mean":  # the callable gives whole vectors
            raise InvalidOptionError(
                "reducer= is not read with a callable embedding: it returns one vector per "
                "response; reduce inside it"
            )
        # a float failed deep inside, True ran as 1, a float seed ran as another seed
        samples_per_coalition = require_int("samples_per_coalition", samples_per_coalition, 1)
        seed = require_int("seed", seed, 0)
        require_real("empty_value", empty_value)  # NaN would spread to every attribution
        self.embedding = embedding
        self.context = context
        self.reducer = _reduce(reducer) if isinstance(reducer, str) else reducer
        self.similarity = _similarity(similarity) if isinstance(similarity, str) else similarity
        gen_args = dict(gen_args or {})
        do_sample = gen_args.pop("do_sample", None)
        text = {
            key: _sampling_setting(key, value, gen_args, do_sample)
            for key, value in (
                ("temperature", temperature),
                ("top_k", top_k),
                ("top_p", top_p),
                ("min_p", min_p),
            )
        }
        audio = {
            key: _sampling_setting(key, value, gen_args, do_sample)
            for key, value in (
                ("audio_temperature", audio_temperature),
                ("audio_top_k", audio_top_k),
            )
        }
        check_sampling({**text, **audio})
        self.gen_args = {"max_new_tokens": 25, "do_sample": False, **gen_args}
        self.samples = samples_per_coalition
        named = [k for k, v in {**text, **audio}.items() if v is not None]
        self.sampled = samples_per_coalition > 1 or bool(do_sample) or bool(named)
        # Text is sampled when asked, or by default when several samples are
        # wanted and no modality was named; otherwise it stays greedy (0).
        self.sample_text = self.sampled and (set(named) & set(text) or not named)
        if self.sampled:
            self.gen_args.update(
                do_sample=True,
                **{k: v for k, v in text.items() if v is not None},  # the rest: the model's
                **({} if self.sample_text else {"temperature": 0}),
                **{k: v for k, v in audio.items() if v is not None},  # audio-output adapters
            )
        self.seed = seed
        self.empty_value = empty_value
        self._settings = {
            "embedding": embedding if isinstance(embedding, str) else _name(embedding),
            "context": context,
            "reducer": reducer if isinstance(reducer, str) else _name(reducer),
            "similarity": similarity if isinstance(similarity, str) else _name(similarity),
            "gen_args": {k: v for k, v in sorted(self.gen_args.items())},
            "samples_per_coalition": samples_per_coalition,
            "seed": seed,
            "empty_value": empty_value,
        }

    def n_columns(self, response: Response) -> int:
        """The mean similarity, then one column per sample when sampling several."""
        return 1 + self.samples if self.samples > 1 else 1

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def fingerprint(self) -> Any:
        # Two lambdas share a name: their constants and closures tell them apart.
        return [self._settings, plain([self.embedding, self.reducer, self.similarity])]

    def prepare(
        self,
        model: ModelAdapter,
        full: MaskedChat,
        response: Response,
        per_step: bool = False,
        reuse_prefix: bool = True,
    ) -> _SimilarityState:
        """The reference: the vector of the explained answer, computed once."""
        context = full.encoded if self.context == "chat" else None
        end = (self.gen_args or {}).get("eos_token_id")  # a call's own end token, as the model's
        vectors, ok = self.vectors(model, [model.strip_response(response, end)], context)
        return _SimilarityState(vectors[0] if bool(ok[0]) else None, context)

    def evaluate(
        self, model: ModelAdapter, masked: MaskedChat, response: Response, state: Any
    ) -> TargetValues:
        """Regenerate, embed and compare B coalitions.

        Sampled answers of a coalition are seeded from (seed, the coalition):
        the same in any batch, order or call.

        Returns:
            TargetValues: ``(B, 1)`` greedy, or ``(B, 1 + k)`` (mean, then each sample).
        """
        if state is None:
            state = self.prepare(model, masked, response)  # reads only the encoded chat
        k = self.samples
        seeds = None
        if self.sampled:
            keys = coalition_keys(masked.present)
            seeds = [coalition_seed(self.seed, key, j) for key in keys for j in range(k)]
        if k > 1:
            masked = replace(masked, present=masked.present.repeat_interleave(k, dim=0))
        args = dict(self.gen_args or {})
        if self.sample_text:  # settings not given: the model's own
            args = {**model.sampling_defaults, **args}
        said = model.generate_masked(masked, seeds=seeds, **args)
        end = (self.gen_args or {}).get("eos_token_id")
        said = [model.strip_response(r, end) for r in said]
        values = self.values(model, said, state.reference, state.context).reshape(-1, k)
        texts = [r.text for r in said]
        per_coalition = texts if k == 1 else [texts[i : i + k] for i in range(0, len(texts), k)]
        if k == 1:
            return TargetValues(values, "total", per_coalition)
        mean = values.mean(dim=1, keepdim=True)
        return TargetValues(torch.cat([mean, values], dim=1), "samples", per_coalition)

    def values(
        self,
        model: ModelAdapter,
        responses: list[Response],
        reference: Tensor | None,
        context: EncodedChat | None = None,
    ) -> Tensor:
        """Similarity of each response to the reference vector: ``(N,)``;
        ``empty_value`` for empty responses and zero-norm vectors."""
        out = torch.full((len(responses),), float(self.empty_value))
        vectors, ok = self.vectors(model, responses, context)
        if reference is None or not ok.any():
            return out
        sims = torch.as_tensor(self.similarity(vectors[ok], reference)).float().cpu()
        if sims.shape != (int(ok.sum()),):  # a scalar was broadcast: every coalition alike
            raise TargetError(
                f"the similarity gave shape {tuple(sims.shape)} for {int(ok.sum())} vectors; "
                "it must return one value per row of its (N, d) first argument"
            )
        out[ok] = torch.nan_to_num(sims, nan=float(self.empty_value))
        return out

    def vectors(
        self, model: ModelAdapter, responses: list[Response], context: EncodedChat | None = None
    ) -> tuple[Tensor, Tensor]:
        """Reduced vectors ``(N, d)`` and a mask of the usable ones (non-empty, non-zero)."""
        nonempty = [i for i, r in enumerate(responses) if len(r) > 0]
        if callable(self.embedding):
            texts = [responses[i].text for i in nonempty]
            given = torch.as_tensor(self.embedding(texts)).float() if texts else None
            if given is not None and (given.dim() != 2 or len(given) != len(texts)):
                raise TargetError(  # an IndexError or a zip error deep inside
                    f"the embedding gave shape {tuple(given.shape)} for {len(texts)} texts; it "
                    "must return an (N, d) tensor, one vector per text"
                )
            reduced = list(given) if given is not None else []
        else:
            if self.embedding == "static":
                per_token = [model.token_embeddings(responses[i]) for i in nonempty]
            else:
                per_token = model.response_states([responses[i] for i in nonempty], context)
            reduced = [self.reducer(t.float()) for t in per_token]
        if not reduced:
            return torch.zeros(len(responses), 1), torch.zeros(len(responses), dtype=torch.bool)
        dim = reduced[0].shape[-1] if reduced[0].dim() else 0
        if dim == 0 or any(v.shape != (dim,) for v in reduced):
            raise TargetError(
                f"the reducer gave shapes {sorted({tuple(v.shape) for v in reduced})}; it must "
                "reduce each response's (n, d) states to one (d,) vector"
            )
        if not all(bool(torch.isfinite(v).all()) for v in reduced):  # NaN read as empty
            warn_caller(
                "some response vectors hold NaN or infinite values (a float16 overflow, or the "
                "embedding's own); their coalitions get empty_value"
            )
        vectors = torch.zeros(len(responses), dim)
        ok = torch.zeros(len(responses), dtype=torch.bool)
        for i, v in zip(nonempty, reduced, strict=True):
            vectors[i] = v.detach().cpu()
            ok[i] = bool(v.norm() > 0)
        return vectors, ok


@dataclass(frozen=True)
class _SimilarityState:
    reference: Tensor | None
    context: EncodedChat | None


def _name(fn: Any) -> str:
    """A callable's stable name, for settings (its module and qualified name)."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
