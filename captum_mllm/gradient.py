"""Gradient attributions on the same multimodal features.

Shapley values need many model calls; gradients need one or two passes per
output token (attention, :mod:`captum_mllm.attention`, one forward). Both give a
:class:`~captum_mllm.result.MultimodalLLMAttributionResult` over the same
features (words, tokens, audio spans, turns) as the perturbation methods, so
plots, reports, save/load and :func:`captum_mllm.compare` work unchanged.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable
from copy import copy
from typing import Any

import numpy as np
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
from torch import Tensor, nn

from captum_mllm.answers import (
    answer_probs,
    answered_input,
    check_positions,
    require_same_model,
    resolve_response,
)
from captum_mllm.captum_compat import (
    DEFAULT_GEN_ARGS,
    drawing,
    global_draws,
    labelled_as_ours,
)
from captum_mllm.contrastive import ContrastiveTarget
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
from captum_mllm.method_args import is_scalar, require_known_kwargs
from captum_mllm.models.base import ModelAdapter, Response, in_eval_mode
from captum_mllm.records import chat_fields
from captum_mllm.result import MultimodalLLMAttributionResult
from captum_mllm.targets import LogProbTarget, Target

REDUCTIONS = ("sum", "norm")


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
        target (Target, optional): ``ContrastiveTarget(foil)`` attributes the
            answer's log-probability less the foil's, differentiated as one
            function (Yin & Neubig's contrastive gradients: with ``Saliency``
            and ``reduce="norm"`` their contrastive gradient norm); the result
            has ``seq_attr`` alone. Default: each answer token's log-probability

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

    def __init__(
        self,
        attr_method: Any,
        adapter: ModelAdapter,
        reduce: str = "sum",
        target: Target | None = None,
    ) -> None:
        if target is not None and not (
            isinstance(target, ContrastiveTarget)
            or (isinstance(target, LogProbTarget) and target.kind == "log_prob")
        ):
            raise InvalidOptionError(
                f"gradient methods attribute log-probabilities: target= takes "
                f"ContrastiveTarget(foil) or LogProbTarget(), got {target!r}"
            )
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
        self.value_fn: Target = target if target is not None else LogProbTarget()
        self._calls = threading.RLock()  # see _one_call_at_a_time

    def _forward(
        self, embeds: Tensor, response: Response, token: int, foil: Response | None = None
    ) -> Tensor:
        """Answer token ``token``'s log-probability, or with a ``foil`` the whole
        answer's less the foil's (one function, for methods that are not linear)."""
        x = self.embeddings(embeds)
        if foil is None:
            return self.adapter.next_token_log_probs(x, response, token)
        score = self.adapter.response_log_prob  # one teacher-forced forward each
        return score(x, response) - score(x, foil)

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
        contrast = isinstance(self.value_fn, ContrastiveTarget)
        if not isinstance(inp, ChatInput):
            if self.tunnel:  # Captum's path would give the noise to the model's ids
                raise UnsupportedInputError("a NoiseTunnel method takes a ChatInput here")
            if contrast:
                raise UnsupportedInputError("a contrastive gradient takes a ChatInput")
            return self._stock(inp, target, gen_args, **kwargs)
        if "additional_forward_args" in kwargs:  # it replaced ours: a TypeError deep inside
            raise InvalidOptionError(
                "additional_forward_args is the attribution's own (the answer and its token); "
                "extra model inputs belong to the adapter"
            )
        tunnel = tuple(inspect.signature(NoiseTunnel.attribute).parameters) if self.tunnel else ()
        require_known_kwargs(self.method, kwargs, also=tunnel)
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
        foil = None
        if isinstance(self.value_fn, ContrastiveTarget):
            foil = self.value_fn.foil_response(self.adapter, response, inp.encoded)
            check_positions(self.adapter, len(inp.encoded), len(foil))
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
        # One row an answer token, or one for the contrast (differentiated whole)
        for t in range(len(response) if foil is None else 1):
            args: dict[str, Any] = {"additional_forward_args": (response, t, foil), **kwargs}
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
            per_token=foil is None,
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
                "target": {"class": type(self.value_fn).__name__, **self.value_fn.settings()},
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
                what = f"answer token {worst}" if foil is None else "the contrast"
                warn_caller(
                    f"integrated gradients' attributions of {what} sum to "
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
    per_token: bool = True,
) -> MultimodalLLMAttributionResult:
    """A result of per-output-token attributions ``(T, n_features)`` on a chat,
    with each answer token's probability under the whole input ``(T,)``
    (``per_token`` False: one row, the sequence's alone)."""
    provenance = {**provenance, "input_settings": inp.settings()}
    return MultimodalLLMAttributionResult(
        **chat_fields(inp),
        seq_attr=token_attr.sum(0),
        token_attr=token_attr if per_token else None,
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
