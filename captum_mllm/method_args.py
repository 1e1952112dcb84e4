"""What a perturbation method is given: the arguments Captum's methods take
without a word but would get wrong here, each trial's seed, and the settings a
result records."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from captum.attr import FeatureAblation, KernelShap, Lime, PerturbationAttribution

from captum_mllm.errors import (
    InvalidBaselineError,
    InvalidOptionError,
    UnsupportedInputError,
    require_int,
    warn_caller,
)
from captum_mllm.methods.base import ShapleyEstimator

#: How many coalitions Captum's ``Lime`` and ``KernelShap`` sample by default (25).
LIME_DEFAULT_SAMPLES = inspect.signature(Lime.attribute).parameters["n_samples"].default


def trial_seed(seed: int | None, trial: int) -> int | None:
    """The seed of one trial: the given seed for the first, and for later ones
    a seed drawn from (seed, trial), so that averaged trials are independent
    draws (the same seed again would repeat the first trial's coalitions, and
    its standard error would shrink by the square root of ``num_trials`` for
    nothing). None stays None: each trial draws from torch's global generator."""
    if seed is None or trial == 0:
        return seed
    return int(np.random.SeedSequence([seed, trial]).generate_state(1)[0] >> 1)


def require_known_kwargs(
    method: Any, kwargs: dict[str, Any], also: tuple[str, ...] = (), strict: bool = False
) -> None:
    """Raise ``TypeError``, as Python would, for keywords ``method.attribute``
    does not take (or ``also`` names): before the answer is generated, where
    the method's own call raised after it. A method taking ``**kwargs`` takes
    any, unless ``strict`` (FeatureAblation's are for its subclasses: typos vanish)."""
    params = inspect.signature(method.attribute).parameters
    if not strict and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # it takes any: its own checks decide
    unknown = sorted(set(kwargs) - set(params) - set(also))
    if unknown:
        raise TypeError(
            f"{type(method).__name__}.attribute() got unexpected keyword arguments {unknown}"
        )


def check_method_arguments(
    method: PerturbationAttribution, kwargs: dict[str, Any], n: int | None = None
) -> None:
    """Refuse a method's arguments that are wrong for any input (before the
    answer is generated, or a data set's workers load a model); ``n``, the
    features, where known, for an exact method's budget and a tree."""
    if "additional_forward_args" in kwargs:
        raise InvalidOptionError(
            "additional_forward_args is MultimodalLLMAttribution's own (it passes the "
            "coalition evaluator); extra model inputs belong to the adapter"
        )
    baselines = kwargs.get("baselines")
    parts = baselines if isinstance(baselines, tuple) else (baselines,)  # Captum takes tuples
    if baselines is not None and not all(bool(torch.as_tensor(b).eq(0).all()) for b in parts):
        # Present is nonzero: any other baseline leaves every feature present.
        raise InvalidBaselineError(
            "baselines= is the interpretable tensor's value of an absent feature and must "
            "be 0 here; what an absent feature becomes is the input's: ChatInput's "
            "text_baseline= and audio_baseline=, or Captum's input's baselines="
        )
    if isinstance(method, ShapleyEstimator):
        method.check_arguments(n, **kwargs)
    else:
        require_known_kwargs(method, kwargs, strict=type(method) is FeatureAblation)
        if "n_samples" in kwargs:
            require_int("n_samples", kwargs["n_samples"], 1)


def check_method_kwargs(method: PerturbationAttribution, n: int, kwargs: dict[str, Any]) -> None:
    """Refuse the arguments Captum's methods take here without a word but whose
    values would come out wrong (all zero, NaN) or be ignored."""
    check_method_arguments(method, kwargs, None if "feature_mask" in kwargs else n)
    mask = kwargs.get("feature_mask")
    if mask is not None:  # a wrong one failed deep inside Captum, a -1 meant three things
        mask = torch.as_tensor(mask[0] if isinstance(mask, tuple) and len(mask) == 1 else mask)
        if (
            mask.is_floating_point()
            or mask.dtype == torch.bool
            or mask.numel() != n
            or (mask.numel() and int(mask.min()) < 0)
        ):
            raise InvalidOptionError(
                f"feature_mask must hold one integer group id >= 0 for each of the {n} "
                f"features, got {mask.dtype} of shape {tuple(mask.shape)}"
            )
    if isinstance(method, KernelShap) and n == 1:  # its size distribution is 0/0 (NaN)
        raise UnsupportedInputError(
            "Captum's KernelShap samples coalitions of sizes between none and all, and one "
            "feature has none: its value is the whole change (FeatureAblation, or "
            "captum_mllm.methods.ExactShapleyValues, gives it)"
        )
    if isinstance(method, Lime):  # Captum's default is 25 samples, whatever the features
        n_samples = kwargs.get("n_samples", LIME_DEFAULT_SAMPLES)
        if n_samples <= n:
            warn_caller(
                f"{type(method).__name__} fits {n + 1} coefficients to n_samples={n_samples} "
                "coalitions: the regression is underdetermined (attributions may be all "
                f"zero); give n_samples > {n}"
            )


def method_settings(method: Any) -> dict[str, Any]:
    """The arguments a method was built with (``prune=``, ``exact_limit=``, ...),
    where they are plain values or classes (named): what its values also hang on.
    A Captum method's arguments that are functions or models are left out."""
    params = inspect.signature(type(method).__init__).parameters
    settings = {}
    for name in params:
        value = getattr(method, name, inspect.Parameter.empty)
        if name == "forward_func" or value is inspect.Parameter.empty:
            continue
        if isinstance(value, type):
            settings[name] = value.__name__
        elif is_scalar(value):
            settings[name] = value
    return settings


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)
