"""Gradient and attention attributions on the same multimodal features.

Shapley values need many model calls; gradients need one or two passes per
output token, attention one forward. Both give a
:class:`~captum_mllm.result.MultimodalLLMAttributionResult` over the same
features (words, tokens, audio spans, turns) as the perturbation methods, so
plots, reports, save/load and :func:`captum_mllm.compare` work unchanged.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from copy import copy
from typing import Any

import numpy as np
import pandas as pd
import torch
from captum.attr import (
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    LayerGradientShap,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    LLMGradientAttribution,
    NoiseTunnel,
    Saliency,
)
from captum.attr._utils.interpretable_input import InterpretableInput
from scipy.stats import spearmanr
from torch import Tensor, nn

from captum_mllm.answers import (
    answer_probs,
    answered_input,
    require_same_model,
    resolve_response,
)
from captum_mllm.attribution import chat_fields
from captum_mllm.captum_compat import (
    DEFAULT_GEN_ARGS,
    drawing,
    global_draws,
    labelled_as_ours,
)
from captum_mllm.errors import (
    InvalidBaselineError,
    InvalidModelError,
    InvalidOptionError,
    TargetError,
    UnsupportedInputError,
    require_built,
    require_int,
    warn_caller,
)
from captum_mllm.inputs import ChatInput
from captum_mllm.method_args import is_scalar
from captum_mllm.models.base import ModelAdapter, Response, in_eval_mode
from captum_mllm.process_wide import PROCESS_WIDE
from captum_mllm.result import MultimodalLLMAttributionResult

REDUCTIONS = ("sum", "norm")
AGGREGATIONS = ("mean", "max", "rollout")


class _Embeddings(nn.Identity):
    """The layer a Layer method attributes to: the prompt's input embeddings."""


def _differentiable[Method: Callable[..., Any]](method: Method) -> Method:
    """Run ``method`` with gradients on, also inside the caller's
    ``torch.no_grad()`` or ``torch.inference_mode()`` (a notebook cell's, say)."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return method(*args, **kwargs)

    return run  # type: ignore[return-value]


def _one_call_at_a_time[Method: Callable[..., Any]](method: Method) -> Method:
    """Calls on one instance take turns: a Layer method hooks the instance's
    embeddings layer for the call, and two threads' calls read each other's
    hooks (an ``IndexError`` or a shape error; separate instances never did)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._calls:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class MultimodalLLMGradientAttribution(LLMGradientAttribution):
    """Gradient attributions of a chat model's answer, on :class:`ChatInput` features.

    A subclass of Captum's ``LLMGradientAttribution``. With a ``ChatInput`` the
    gradient method runs on the prompt's input embeddings (text token
    embeddings and, for LFM2-Audio, the audio adapter's output), per output
    token, against the log-probability of that token; each position's
    attribution is reduced over the embedding dimension (``reduce="sum"``, or
    ``"norm"``: its L2 norm) and summed over each feature's positions.
    Positions outside every feature keep their embeddings on the whole path
    and get no attribution. Captum's own ``TextTokenInput`` works as in Captum.

    Args:
        attr_method (GradientAttribution): ``LayerIntegratedGradients``,
            ``LayerGradientXActivation``, ``LayerGradientShap`` (built on the
            adapter and any layer: the layer is replaced by the embeddings),
            or ``IntegratedGradients``, ``Saliency``, ``InputXGradient``,
            ``GradientShap`` built on the adapter; or Captum's ``NoiseTunnel``
            around one (SmoothGrad: ``nt_samples=``, ``stdevs=`` in embedding
            units, noise on every prompt position, drawn from torch's generator).
        adapter (ModelAdapter): the model.
        reduce (str, optional): ``"sum"`` or ``"norm"`` over the embedding
            dimension. Default: ``"sum"``

    Examples::

        >>> from captum.attr import LayerIntegratedGradients
        >>> lig = LayerIntegratedGradients(model, model.model.get_input_embeddings())
        >>> attr = MultimodalLLMGradientAttribution(lig, model)
        >>> res = attr.attribute(inp, n_steps=64, internal_batch_size=32)
        >>> res.provenance["completeness_gap"]  # |sum - (f(x) - f(b))| / |f(x) - f(b)|
    """

    SUPPORTED_METHODS = (
        LayerIntegratedGradients,
        LayerGradientXActivation,
        LayerGradientShap,
        IntegratedGradients,
        Saliency,
        InputXGradient,
        GradientShap,
    )
    SUPPORTED_INPUTS = (ChatInput, *LLMGradientAttribution.SUPPORTED_INPUTS)

    def __init__(self, attr_method: Any, adapter: ModelAdapter, reduce: str = "sum") -> None:
        if not isinstance(adapter, ModelAdapter):
            raise InvalidModelError(
                "MultimodalLLMGradientAttribution takes a model adapter, got "
                f"{type(adapter).__name__}"
            )
        # SmoothGrad and its kin: Captum's NoiseTunnel around a supported method
        self.tunnel = isinstance(attr_method, NoiseTunnel)
        method = attr_method.attribution_method if self.tunnel else attr_method
        require_built(method)
        require_same_model(method, adapter)
        if not isinstance(method, self.SUPPORTED_METHODS):
            raise UnsupportedInputError(
                f"{type(method).__name__} is not supported; use one of "
                f"{', '.join(m.__name__ for m in self.SUPPORTED_METHODS)} (or a NoiseTunnel "
                "around one)"
            )
        if reduce not in REDUCTIONS:
            raise InvalidOptionError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.method = copy(method)  # ours: forward from embeddings
        self.embeddings = _Embeddings()
        self.method.forward_func = self._forward
        if hasattr(self.method, "layer"):
            self.method.layer = self.embeddings
        self.chat_method: Any = NoiseTunnel(self.method) if self.tunnel else self.method
        # Captum's own path (TextTokenInput) needs the Hugging Face model and its layer.
        stock = copy(method)
        stock.forward_func = getattr(adapter, "model", adapter)
        super().__init__(stock, adapter.tokenizer)
        self.adapter = adapter
        self.reduce = reduce
        self._calls = threading.RLock()  # see _one_call_at_a_time

    def _forward(self, embeds: Tensor, response: Response, token: int) -> Tensor:
        return self.adapter.next_token_log_probs(self.embeddings(embeds), response, token)

    @_one_call_at_a_time
    @in_eval_mode
    @_differentiable
    def attribute(  # type: ignore[override]
        self,
        inp: InterpretableInput,
        target: str | Tensor | None = None,
        gen_args: dict[str, Any] | None = None,
        baselines: int | Tensor | None = None,
        keep_eos: bool = False,
        seed: int | None = None,
        **kwargs: Any,
    ) -> MultimodalLLMAttributionResult:
        """Attribute each answer token's log-probability to the input's features.

        Args:
            inp (ChatInput or TextTokenInput): the input.
            target (str or Tensor, optional): the response; None generates the
                greedy answer (or takes the chat's final assistant turn). Default: None
            gen_args (dict, optional): generation arguments when ``target`` is None.
            baselines (int or Tensor, optional): what feature positions move
                from: None zeros, an int the embedding of that token id at text
                positions (zeros at audio ones), a ``(D,)`` tensor that vector.
                The ``ChatInput``'s ``text_baseline`` and ``audio_baseline`` are
                not read: they say what absence means to perturbation methods.
                Default: None
            keep_eos (bool, optional): keep a generated answer's end token. Default: False
            seed (int, optional): what the method draws (``NoiseTunnel``'s noise,
                ``GradientShap``'s baselines and points) is drawn from torch's
                generator seeded with it, and the caller's generator does not
                move; kept in ``provenance["method_args"]``. None draws from torch's
                global generator, as Captum does. Default: None
            **kwargs: passed to the method's ``attribute`` (``n_steps``,
                ``internal_batch_size``, ``n_samples``, ``stdevs``, ...).

        Returns:
            MultimodalLLMAttributionResult: ``token_attr`` ``(T, n_features)``,
            ``seq_attr`` their sum; for integrated gradients
            ``provenance["completeness_gap"]`` (the largest relative gap over
            tokens) and ``provenance["convergence_delta"]`` (per token).
        """
        draws = self.tunnel or isinstance(self.method, GradientShap | LayerGradientShap)
        if (seed is not None or draws) and not drawing():  # torch's generator, held for it
            seed = None if seed is None else require_int("seed", seed, 0)
            with global_draws(seed, self.adapter.device):
                res = self.attribute(inp, target, gen_args, baselines, keep_eos, **kwargs)
            if seed is not None:
                res.provenance["method_args"]["seed"] = seed
            return res
        if not isinstance(inp, ChatInput):
            if self.tunnel:  # Captum's path would give the noise to the model's ids
                raise UnsupportedInputError("a NoiseTunnel method takes a ChatInput here")
            return self._stock(inp, target, gen_args, **kwargs)
        if "additional_forward_args" in kwargs:  # it replaced ours: a TypeError deep inside
            raise InvalidOptionError(
                "additional_forward_args is the attribution's own (the answer and its token); "
                "extra model inputs belong to the adapter"
            )
        # Captum asserts (gone under python -O) or fails deep inside (a float n_steps)
        for name in ("n_steps", "n_samples", "nt_samples"):
            if kwargs.get(name) is not None:
                require_int(name, kwargs[name], 1)
        start = time.perf_counter()
        calls_before = self.adapter.thread_forward_calls()
        inp = answered_input(inp, target)
        response, _ = resolve_response(
            self.adapter, inp, target, gen_args, keep_eos, DEFAULT_GEN_ARGS
        )
        embeds = self.adapter.input_embeddings(inp.encoded)[None]  # (1, L, D)
        embeds.requires_grad_()  # what the method differentiates (Captum would warn)
        owner = inp.feature_of_position.to(embeds.device)
        base = self._baseline(inp, embeds, owner, baselines)
        # Integrated gradients' completeness check: not through a tunnel's noise
        integrated = not self.tunnel and isinstance(
            self.method, IntegratedGradients | LayerIntegratedGradients
        )
        takes_baselines = "baselines" in inspect.signature(self.method.attribute).parameters
        if baselines is not None and not takes_baselines:  # it would go unread
            raise InvalidBaselineError(
                f"{type(self.method).__name__} takes no baselines; leave baselines= out "
                "or use a method that integrates from them (e.g. IntegratedGradients)"
            )
        rows, deltas, gaps, misses = [], [], [], []
        for t in range(len(response)):
            args: dict[str, Any] = {"additional_forward_args": (response, t), **kwargs}
            if takes_baselines:
                args["baselines"] = base
            if integrated:
                args["return_convergence_delta"] = True
            with torch.enable_grad():
                out = self.chat_method.attribute(embeds, **args)
            if integrated:
                out, delta = out
                deltas.append(float(delta.sum()))
                # Captum's delta is sum(attributions) - (f(x) - f(baseline)): the
                # change follows without two more forwards per token
                span = float(out.detach().sum()) - float(delta.sum())
                gaps.append(abs(float(delta.sum())) / max(abs(span), 1e-12))
                # what the warning weighs: a miss beyond 5% of the change, and 0.01 nats
                misses.append(abs(float(delta.sum())) - COMPLETENESS_WARNING * abs(span))
            rows.append(self._per_feature(out.detach()[0], owner, inp.n_itp_features))
        probs = answer_probs(self.adapter, inp, response)
        res = token_result(
            inp,
            response,
            torch.stack(rows).float(),
            probs,
            provenance={
                "adapter": type(self.adapter).__name__,
                "method": (
                    f"NoiseTunnel({type(self.method).__name__})"
                    if self.tunnel
                    else type(self.method).__name__
                ),
                "method_args": {k: v for k, v in kwargs.items() if is_scalar(v)},
                "reduce": self.reduce,
                "baselines": baselines if isinstance(baselines, int) else None,
                "input": "ChatInput",
            },
            n_model_calls=self.adapter.thread_forward_calls() - calls_before,
            start=start,
        )
        if integrated:  # kept with the result (saved with it)
            res.provenance["convergence_delta"] = deltas
            res.provenance["completeness_gap"] = max(gaps)
            worst = int(np.argmax(misses))
            if misses[worst] > 0.01:
                # Captum's default 50 steps left SmolLM2's sums 23% off, a tiny Llama's 68%.
                warn_caller(
                    f"integrated gradients' attributions of answer token {worst} sum to "
                    f"{abs(deltas[worst]):.3g} off its log-probability's change from the "
                    f"baseline ({gaps[worst]:.0%} of it; res.provenance['completeness_gap']): "
                    f"raise n_steps ({kwargs.get('n_steps', 50)} now) until this is small"
                )
        return res

    def _stock(
        self, inp: InterpretableInput, target: Any, gen_args: Any, **kwargs: Any
    ) -> MultimodalLLMAttributionResult:
        """Captum's own path, its result carried over."""
        with labelled_as_ours():  # Captum's labels raised on an answer cut in a character
            stock = super().attribute(inp, target=target, gen_args=gen_args, **kwargs)
        return MultimodalLLMAttributionResult(
            seq_attr=stock.seq_attr,
            token_attr=stock.token_attr,
            input_tokens=list(stock.input_tokens),
            output_tokens=list(stock.output_tokens),
        )

    def _baseline(
        self, inp: ChatInput, embeds: Tensor, owner: Tensor, baselines: int | Tensor | None
    ) -> Tensor:
        base = embeds.detach().clone()
        moving = owner >= 0
        if baselines is None:
            base[0, moving] = 0.0
        elif isinstance(baselines, int) and not isinstance(baselines, bool):
            try:  # the adapter's own check of token ids against its vocabulary
                token = self.adapter.check_target(torch.tensor([baselines]))
            except TargetError:
                raise InvalidBaselineError(
                    f"baselines={baselines} is not a token id of this model's vocabulary"
                ) from None
            fill = self.adapter.token_embeddings(token)[0]
            assert inp.encoded.clip is not None
            text = moving & (inp.encoded.clip.to(owner.device) < 0)
            base[0, text] = fill.to(base)
            base[0, moving & ~text] = 0.0
        elif isinstance(baselines, Tensor) and baselines.shape == embeds.shape[-1:]:
            base[0, moving] = baselines.to(base)
        else:
            raise InvalidOptionError(
                f"baselines must be None, a token id or a ({embeds.shape[-1]},) tensor"
            )
        return base

    def _per_feature(self, attr: Tensor, owner: Tensor, n_features: int) -> Tensor:
        """``(L, D)`` -> ``(n_features,)``: reduce over D, sum each feature's positions."""
        per_position = attr.sum(-1) if self.reduce == "sum" else attr.norm(dim=-1)
        keep = owner >= 0
        out = torch.zeros(n_features, dtype=per_position.dtype, device=per_position.device)
        return out.index_add_(0, owner[keep], per_position[keep]).cpu()


class AttentionAttribution:
    """Attention from each answer token to each feature, in one forward.

    The model reads the prompt and the answer with its attention weights
    returned (eager attention is switched on for the call), and the weights
    from the position that predicts each answer token to each input position
    are aggregated over the chosen layers and heads: ``"mean"`` or ``"max"``
    over them, or ``"rollout"`` (Abnar & Zuidema 2020: heads averaged, the
    residual added as ``0.5 A + 0.5 I``, rows renormalised, layers multiplied
    in order). A feature gets the sum over its positions.

    Args:
        adapter (ModelAdapter): an adapter whose ``attention_inputs`` names a
            transformers model that returns attention weights (a Hugging Face
            causal LM; LFM2-Audio's backbone, read from the prompt's embeddings,
            audio included).
        aggregate (str, optional): ``"mean"``, ``"max"`` or ``"rollout"``. Default: ``"mean"``
        layers (list of int, optional): the layers to use, each once, counted
            among those with attention weights (a hybrid model's state-space
            or convolution layers have none, and are not seen: it warns);
            rollout takes them bottom up, in whatever order they are given.
            Default: all
        heads (list of int, optional): the heads to use, each once. Default: all

    Examples::

        >>> res = AttentionAttribution(model, aggregate="rollout").attribute(inp)
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        aggregate: str = "mean",
        layers: list[int] | None = None,
        heads: list[int] | None = None,
    ) -> None:
        if aggregate not in AGGREGATIONS:
            raise InvalidOptionError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        self.adapter = adapter
        self.aggregate = aggregate
        self.layers = layers
        self.heads = heads

    def attentions(self, inp: ChatInput, response: Response) -> list[Tensor]:
        """Each layer's ``(heads, W, W)`` attention weights over prompt + answer
        (layers without weights over every position, such as MiniMax's
        lightning-attention blocks, are left out, with a warning; the head
        count may differ by layer)."""
        module, inputs = self.adapter.attention_inputs(inp.encoded, response)
        model: Any = module  # a transformers model: its config and attention switch
        if not hasattr(model, "set_attn_implementation"):
            raise InvalidModelError(
                f"{type(self.adapter).__name__} does not return attention weights"
            )
        width = len(inp.encoded) + len(response) - 1
        with PROCESS_WIDE:  # another thread's call on this model would run eager too
            before = model.config._attn_implementation
            model.set_attn_implementation("eager")
            try:
                with torch.no_grad():
                    out = model(**inputs, output_attentions=True)
            finally:
                model.set_attn_implementation(before)
            self.adapter.n_forward_calls += 1  # under the lock, as the adapters count theirs
        every = (width, width)
        maps = [
            a[0].float()
            for a in getattr(out, "attentions", None) or ()
            if a is not None and a.shape[-2:] == every
        ]
        name = type(model).__name__
        if not maps:  # a state-space model (Mamba) mixes positions without attention
            raise InvalidModelError(
                f"{name} returns no attention weights: explain it with a perturbation "
                "method (MultimodalLLMAttribution) or gradients"
            )
        if not self.adapter.is_causal:
            warn_caller(
                f"{name} reads later positions: each answer token's attention comes from one "
                "forward holding the whole answer, not from the forward that predicts it"
            )
        config = getattr(model, "config", None)
        n_layers = getattr(config, "num_hidden_layers", None) or len(maps)
        other = {  # linear attention is a recurrence (Gated DeltaNet, Mamba 2)
            kind
            for kind in getattr(config, "layer_types", None) or ()
            if not kind.endswith("attention") or kind == "linear_attention"
        }
        if len(maps) < n_layers or other:
            warn_caller(
                f"{name}'s {', '.join(sorted(other)) or 'other'} layers mix positions "
                f"without attention weights (those come from {len(maps)} of its "
                f"{n_layers} layers): attention attributions do not see that mixing"
            )
        return maps

    @in_eval_mode
    def attribute(
        self,
        inp: ChatInput,
        target: str | Tensor | None = None,
        gen_args: dict[str, Any] | None = None,
        keep_eos: bool = False,
    ) -> MultimodalLLMAttributionResult:
        """Attention attributions ``(T, n_features)`` of each answer token.

        Args:
            inp (ChatInput): the input.
            target, gen_args, keep_eos: as :meth:`MultimodalLLMAttribution.attribute`.
        """
        if not isinstance(inp, ChatInput):
            raise UnsupportedInputError("AttentionAttribution takes a ChatInput")
        start = time.perf_counter()
        inp = answered_input(inp, target)
        response, _ = resolve_response(
            self.adapter, inp, target, gen_args, keep_eos, DEFAULT_GEN_ARGS
        )
        att = self.attentions(inp, response)  # each layer's (heads, W, W)
        if self.layers is not None:
            att = [att[i] for i in _chosen("layers", self.layers, len(att))]
        if self.heads is not None:
            index = _chosen("heads", self.heads, min(len(a) for a in att))
            att = [a[index] for a in att]
        n_prompt = len(inp.encoded)
        per_position = aggregate_attention(att, self.aggregate)  # (W, W)
        queries = per_position[n_prompt - 1 : n_prompt - 1 + len(response), :n_prompt]
        owner = inp.feature_of_position
        keep = owner >= 0
        token_attr = torch.zeros(len(response), inp.n_itp_features)
        token_attr.index_add_(1, owner[keep], queries[:, keep].cpu())
        return token_result(
            inp,
            response,
            token_attr,
            answer_probs(self.adapter, inp, response),
            provenance={
                "adapter": type(self.adapter).__name__,
                "method": f"AttentionAttribution({self.aggregate})",
                "layers": self.layers,
                "heads": self.heads,
            },
            n_model_calls=2,  # the attention weights', and the answer's probabilities
            start=start,
        )


#: Integrated gradients warn when an answer token's attributions miss its
#: log-probability's change by more than this share of it, plus 0.01 nats.
COMPLETENESS_WARNING = 0.05


def token_result(
    inp: ChatInput,
    response: Response,
    token_attr: Tensor,
    output_probs: Tensor,
    provenance: dict[str, Any],
    n_model_calls: int,
    start: float,
) -> MultimodalLLMAttributionResult:
    """A result of per-output-token attributions ``(T, n_features)`` on a chat,
    with each answer token's probability under the whole input ``(T,)``."""
    provenance = {**provenance, "input_settings": inp.settings()}
    return MultimodalLLMAttributionResult(
        **chat_fields(inp),
        seq_attr=token_attr.sum(0),
        token_attr=token_attr,
        input_tokens=list(inp.values),
        output_tokens=list(response.labels),
        output_probs=output_probs,
        target_ids=response.ids,
        response_text=response.text,
        output_audio=response.audio,
        provenance=provenance,
        n_model_calls=n_model_calls,
        wall_time=time.perf_counter() - start,
    )


def _chosen(name: str, chosen: list[int], count: int) -> list[int]:
    """The layers or heads chosen, as indices below ``count``: sorted and once
    each (rollout multiplies layers bottom up, and a repeated index would weigh
    twice in a mean)."""
    if not chosen or any(not -count <= i < count for i in chosen):
        raise InvalidOptionError(  # none chosen gave NaN, one too many an IndexError
            f"{name} must be a non-empty list of indices below {count}, got {chosen!r}"
        )
    return sorted({i % count for i in chosen})


def aggregate_attention(att: Sequence[Tensor], how: str) -> Tensor:
    """Each layer's ``(heads, W, W)`` (or a ``(layers, heads, W, W)`` tensor) ->
    ``(W, W)`` by ``"mean"`` (of each layer's head mean), ``"max"`` or ``"rollout"``."""
    if how == "mean":
        return torch.stack([layer.mean(0) for layer in att]).mean(0)
    if how == "max":
        return torch.stack([layer.amax(0) for layer in att]).amax(0)
    eye = torch.eye(att[0].shape[-1], device=att[0].device)
    rollout = eye
    for layer in att:
        a = 0.5 * layer.mean(0) + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def compare(
    *results: MultimodalLLMAttributionResult,
    names: list[str] | None = None,
    target_token_pos: int | None = None,
    show: bool = False,
) -> tuple[pd.DataFrame, Any]:
    """Rank agreement between explanations of the same features.

    Args:
        *results: two or more results over the same features (or one list of them).
        names (list of str, optional): a name per result. Default: each result's method
        target_token_pos (int, optional): compare that output token's row; None
            the sequence attributions. Default: None
        show (bool, optional): show the plot instead of returning it. Default: False

    Returns:
        tuple: ``(Spearman rank correlation matrix as a DataFrame, (fig, ax) or None)``.

    Examples::

        >>> table, (fig, ax) = compare(shapley_res, ig_res, attention_res)
    """
    import matplotlib.pyplot as plt

    if len(results) == 1 and isinstance(results[0], list | tuple):  # compare([a, b])
        results = tuple(results[0])
    if len(results) < 2:
        raise InvalidOptionError("compare needs at least two results")
    first = results[0]
    for r in results[1:]:  # equal counts are not enough: rows must pair up feature by feature
        if list(r.input_tokens) != list(first.input_tokens):
            raise InvalidOptionError(
                f"the results explain different features ({first.input_tokens} and "
                f"{r.input_tokens}); compare explanations of the same ChatInput"
            )
        if target_token_pos is not None and list(r.output_tokens) != list(first.output_tokens):
            raise InvalidOptionError(
                "the results explain different responses; compare their sequence "
                "attributions (target_token_pos=None) or explain the same target"
            )
    if names is None:  # two runs of one method: "Saliency (1)", "Saliency (2)"
        methods = [str(r.provenance.get("method", f"result {i}")) for i, r in enumerate(results)]
        names = [m if methods.count(m) == 1 else f"{m} ({methods[:i].count(m) + 1})"
                 for i, m in enumerate(methods)]  # fmt: skip
    if len(names) != len(results):
        raise InvalidOptionError(f"{len(names)} names for {len(results)} results")
    if len(set(names)) != len(names):  # the table's rows could not be told apart
        raise InvalidOptionError(f"names must differ, got {names}")
    rows = np.stack([r._row(target_token_pos).numpy() for r in results])
    k = len(results)
    flat = [bool(np.ptp(row) == 0) for row in rows]  # no ranking: undefined, as in pandas
    if any(flat):
        warn_caller(
            f"{[n for n, f in zip(names, flat, strict=True) if f]} give every feature the "
            "same attribution: their rank correlations are undefined (NaN)"
        )
    matrix = np.ones((k, k))
    for i in range(k):
        for j in range(i, k):
            rho = np.nan if flat[i] or flat[j] else spearmanr(rows[i], rows[j]).statistic
            matrix[i, j] = matrix[j, i] = 1.0 if i == j and not flat[i] else rho
    table = pd.DataFrame(matrix, index=names, columns=names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.2 * k + 1))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="Spearman rank correlation")
    ax.set_title("Agreement between explanations")
    if show:
        plt.show()
        return table, None
    return table, (fig, ax)
