"""Attention attributions: the weights from each answer token's position to
each feature's positions, in one forward (see :class:`AttentionAttribution`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from captum_mllm.answers import answer_probs, answered_input, resolve_response
from captum_mllm.captum_compat import DEFAULT_GEN_ARGS
from captum_mllm.errors import (
    InvalidModelError,
    InvalidOptionError,
    UnsupportedInputError,
    is_int,
    warn_caller,
)
from captum_mllm.gradient import token_result
from captum_mllm.inputs import ChatInput
from captum_mllm.models.base import ModelAdapter, Response, in_eval_mode
from captum_mllm.process_wide import PROCESS_WIDE
from captum_mllm.result import MultimodalLLMAttributionResult

AGGREGATIONS = ("mean", "max", "rollout")


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
        for name, chosen in (("layers", layers), ("heads", heads)):  # their range: at the call
            if chosen is not None and (
                isinstance(chosen, str) or not chosen or not all(map(is_int, chosen))
            ):
                raise InvalidOptionError(
                    f"{name} must be a non-empty list of indices, got {chosen!r}"
                )
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
