"""Everything that touches Captum's private API, in one place.

Captum 0.9 keeps the pieces a drop-in ``LLMAttribution`` needs in
``captum.attr._core.llm_attr`` (the default generation arguments, its token
labels, how it turns an input into model kwargs, its single-coalition forward
for image inputs). They are private and may move between releases, so no
other module imports them: when Captum changes, this file changes.
"""

from __future__ import annotations

import random
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from captum.attr import (
    FeatureAblation,
    ImageMaskInput,
    InterpretableInput,
    Lime,
    LLMAttribution,
    ShapleyValueSampling,
    TextTemplateInput,
)
from captum.attr._core.llm_attr import DEFAULT_GEN_ARGS as _DEFAULT_GEN_ARGS
from captum.attr._core.llm_attr import _clean_up_pretty_token, _convert_ids_to_pretty_tokens
from captum.attr._core.shapley_value import _perm_generator
from torch import Tensor

from captum_mllm.errors import UnsupportedInputError, require_int
from captum_mllm.models.base import ModelAdapter, token_labels
from captum_mllm.models.hf_causal import HFCausalLMAdapter
from captum_mllm.process_wide import PROCESS_WIDE

#: Captum's generation defaults (greedy, 25 new tokens).
DEFAULT_GEN_ARGS: dict[str, Any] = dict(_DEFAULT_GEN_ARGS)


def adapter_for(model: torch.nn.Module, tokenizer: Any) -> HFCausalLMAdapter:
    """A plain model and its tokenizer, as stock Captum takes them, as an adapter."""
    return HFCausalLMAdapter(model, tokenizer)


def text_scorer(adapter: ModelAdapter) -> Callable[..., Tensor]:
    """The scorer of token-id rows that Captum's text inputs need."""
    if not isinstance(adapter, HFCausalLMAdapter):
        raise UnsupportedInputError(
            "Captum's text inputs need a text model (HFCausalLMAdapter); use ChatInput with "
            f"{type(adapter).__name__}"
        )
    return adapter.score_rows


def text_template_input(inp: Any) -> TextTemplateInput:
    """Captum's ``TextTemplateInput`` for a text-only :class:`~captum_mllm.ChatInput`:
    the rendered prompt with each feature's tokens as a ``{}`` slot, so that
    stock Captum explains the same game (dropping a slot drops its tokens).

    Examples::

        >>> stock = LLMAttribution(ShapleyValueSampling(model.model), model.tokenizer)
        >>> stock.attribute(text_template_input(inp), target=answer_ids)
    """
    enc = inp.encoded
    if any(m != "text" for m in enc.modality):
        raise UnsupportedInputError("only text chats have a Captum text template")
    owner = inp.feature_of_position.tolist()
    template = ""
    values: list[str] = []
    for p, token in enumerate(enc.tokens):
        if owner[p] < 0:
            template += token.replace("{", "{{").replace("}", "}}")
        elif p > 0 and owner[p - 1] == owner[p]:
            values[-1] += token
        else:
            template += "{}"
            values.append(token)
    if len(values) != inp.n_itp_features:
        raise UnsupportedInputError("a feature's tokens are not contiguous; no template fits")
    return TextTemplateInput(template, values)


def pretty_tokens(ids: Tensor, tokenizer: Any) -> list[str]:
    """Output-token labels exactly as stock Captum writes them, except where
    its labelling fails: an answer cut inside a character (``max_new_tokens``
    ending a Chinese character's bytes) raised ``IndexError`` there, after
    warnings of skipped tokens. Such an answer is labelled as ours are, with
    Captum's clean-up of each label."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            labels = _convert_ids_to_pretty_tokens(ids, tokenizer)
        except IndexError:
            labels = []
    if len(labels) != len(ids):
        return token_labels(tokenizer.decode, ids, _clean_up_pretty_token)
    for warning in said:  # Captum's own, for labels it gave
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return labels


@contextmanager
def labelled_as_ours() -> Iterator[None]:
    """Captum's own attribution paths, their output tokens labelled by
    :func:`pretty_tokens` (which survives an answer cut inside a character)."""
    from captum.attr._core import llm_attr

    previous = llm_attr._convert_ids_to_pretty_tokens
    llm_attr._convert_ids_to_pretty_tokens = pretty_tokens
    try:
        yield
    finally:
        llm_attr._convert_ids_to_pretty_tokens = previous


def model_kwargs(attribution: LLMAttribution, model_input: Any) -> dict[str, Any]:
    """Captum's own conversion of an input's model input (str, ids or a
    processor's batch) into keyword arguments of the model."""
    return attribution._format_model_input(model_input)


def coalition_ids(
    attribution: LLMAttribution,
    inp: InterpretableInput,
    coalition: Tensor | None,
    seed: int | None = None,
) -> Tensor:
    """Token ids ``(L,)`` of one coalition of a Captum text input, as Captum
    tokenizes it (templates are rendered, then encoded with special tokens);
    baselines an input draws (:func:`draws_baselines`) are drawn with ``seed``."""
    if seed is None:
        model_input = inp.to_model_input(coalition)
    else:
        with seeded_draws(seed):
            model_input = inp.to_model_input(coalition)
    return model_kwargs(attribution, model_input)["input_ids"].reshape(-1)


def draws_baselines(inp: InterpretableInput) -> bool:
    """Whether a Captum input draws its baselines anew for each coalition: a
    ``TextTemplateInput`` whose ``baselines`` is a callable, such as Captum's
    ``ProductBaselines`` (which draws with Python's ``random``)."""
    return isinstance(inp, TextTemplateInput) and callable(inp.baselines)


def draws_randomly(method: Any, inp: InterpretableInput) -> bool:
    """Whether a Captum method's run draws from the global generators: its
    samplers (``ShapleyValueSampling``, ``Lime``, ``KernelShap``), or an input
    that draws its baselines."""
    return isinstance(method, ShapleyValueSampling | Lime) or draws_baselines(inp)


class _Drawing(threading.local):
    """Whether the calling thread is inside :func:`global_draws`."""

    inside = False


_DRAWING = _Drawing()


def drawing() -> bool:
    """Whether the calling thread is inside :func:`global_draws`."""
    return _DRAWING.inside


@contextmanager
def global_draws(seed: int | None = None, device: torch.device | None = None) -> Iterator[None]:
    """The global generators the block draws from (Captum's samplers draw from
    torch's, ``ProductBaselines`` from Python's) held for it alone: another
    thread's draws there, seeded or not, wait (:mod:`~captum_mllm.process_wide`),
    so that a seeded run gets its draws however many threads explain at once.
    With ``seed``, see :func:`seeded_draws`."""
    with PROCESS_WIDE, seeded_draws(seed, device) if seed is not None else nullcontext():
        before, _DRAWING.inside = _DRAWING.inside, True
        try:
            yield
        finally:
            _DRAWING.inside = before


@contextmanager
def seeded_draws(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Python's, NumPy's and torch's global generators seeded with ``seed`` inside
    the block and put back after it: what a baseline callable draws there is a
    function of ``seed``, and the caller's generators do not move (torch's on
    the CPU, and on ``device`` when it is an accelerator). Another thread's
    seeded block or model call waits (:mod:`~captum_mllm.process_wide`)."""
    on = device if device is not None and device.type != "cpu" else None
    devices = [on] if on is not None else []
    with (
        PROCESS_WIDE,  # another thread's seeded run would reseed them midway
        torch.random.fork_rng(devices=devices, device_type=on.type if on else "cuda"),
    ):
        python, numpy = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def generate(attribution: LLMAttribution, inp: InterpretableInput, **gen_args: Any) -> Tensor:
    """The model's answer to a Captum input, as stock Captum generates it."""
    if gen_args.get("max_new_tokens") is not None:  # as our own inputs check it
        require_int("max_new_tokens", gen_args["max_new_tokens"], 1)
    kwargs = model_kwargs(attribution, inp.to_model_input())
    prompt = kwargs["input_ids"]
    kwargs.setdefault("attention_mask", torch.ones_like(prompt))
    pad = getattr(attribution.tokenizer, "pad_token_id", None)
    if pad is not None:
        gen_args.setdefault("pad_token_id", pad)
    with torch.no_grad():
        out = attribution.model.generate(**kwargs, **gen_args)  # type: ignore[operator]
    return out[0, prompt.shape[1] :]


def stock_image_forward(
    attribution: LLMAttribution, inp: InterpretableInput, per_step: bool
) -> Callable[[Tensor, Tensor], Tensor]:
    """Captum's own single-coalition forward for inputs whose model input comes
    from a processor (images): model-specific, so run as Captum runs it.

    A private stock ``LLMAttribution`` built on ``FeatureAblation`` (which
    attributes per token) computes total and per-token log-probabilities.

    Returns:
        callable: ``(coalition (1, n), target ids (T,)) -> (1 + T,)``.
    """
    if not isinstance(inp, ImageMaskInput):
        raise UnsupportedInputError(f"{type(inp).__name__} is not an image input")
    stock = LLMAttribution(
        FeatureAblation(attribution.model), attribution.tokenizer, attribution.attr_target
    )

    def forward(coalition: Tensor, target_ids: Tensor) -> Tensor:
        if per_step:
            out = stock._forward_func_by_tokens(coalition, inp, target_ids, False)
        else:
            out = stock._forward_func_by_seq(coalition, inp, target_ids)
        return out.reshape(-1)

    return forward


def sampled_coalitions(
    method: Any, n_features: int, n_samples: int, feature_mask: Any = None
) -> Tensor | None:
    """The coalitions Captum's ``ShapleyValueSampling`` is about to ask for:
    the empty one, then every head of each random order, drawn by the same
    ``torch.randperm`` calls it will make (torch's generator state is put back).
    With a ``feature_mask`` it orders the mask's groups, as Captum does.

    Captum evaluates one order at a time (at most ``n + 1`` coalitions a
    forward, however large ``perturbations_per_eval``); evaluating these first,
    in full batches, leaves it nothing but cache hits. Values are unchanged:
    each coalition's value is its own.

    Returns:
        Tensor: ``(M, n_features)`` distinct 0/1 rows, or None for another method.
    """
    if type(method) is not ShapleyValueSampling or method.permutation_generator is not (
        _perm_generator
    ):
        return None
    group = torch.arange(n_features)
    if feature_mask is not None:
        group = torch.as_tensor(feature_mask).reshape(-1).long().cpu()
        if len(group) != n_features or bool((group < 0).any()):
            return None  # Captum will say what is wrong with it
    n_groups = int(group.max()) + 1
    state = torch.get_rng_state()
    try:
        orders = [torch.randperm(n_groups) for _ in range(n_samples)]
    finally:
        torch.set_rng_state(state)
    rows = [torch.zeros(n_groups)]
    for order in orders:
        row = torch.zeros(n_groups)
        for g in order.tolist():
            row = row.clone()
            row[g] = 1.0
            rows.append(row)
    return torch.unique(torch.stack(rows)[:, group], dim=0)
