"""Per-row seeded sampling: one generator a row, so that a coalition's sampled
answer depends on its own seed only, never on its batch; the settings
checked; LFM2-Audio's sampler (temperature, then top-k), as liquid-audio's."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from captum_mllm.errors import InvalidOptionError, require_int


def row_generators(seeds: list[int] | None, device: torch.device) -> list[torch.Generator] | None:
    """One random generator per batch row, so that a row's samples depend on
    its own seed only, never on the batch it was run in."""
    if seeds is None:
        return None
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def check_sampling(settings: dict[str, Any]) -> None:
    """Refuse sampling settings no sampler can mean: temperatures are finite
    and at least 0 (0 is greedy, as in liquid-audio's sampler), top-k's are
    ints of at least 0 (0 keeps every token, as in transformers), top-p,
    min-p, typical-p, top-h and the epsilon and eta cutoffs are between 0 and 1."""
    for key in ("temperature", "audio_temperature"):
        value = settings.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value < 0
        ):
            raise InvalidOptionError(
                f"{key} must be a finite number >= 0 (0: greedy), got {value!r}"
            )
    for key in ("top_k", "audio_top_k"):
        if settings.get(key) is not None:
            require_int(key, settings[key], 0)
    for key in ("top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"):
        share = settings.get(key)
        if share is not None and (
            isinstance(share, bool)
            or not isinstance(share, numbers.Real)
            or not 0 <= float(share) <= 1
        ):
            raise InvalidOptionError(f"{key} must be a number in [0, 1], got {share!r}")


def sampling_probs(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """``(B, V)`` logits -> the probabilities LFM2-Audio's sampler draws from,
    as liquid-audio's and transformers' warpers make them: temperature, then
    top-k. (A Hugging Face model's sampling runs transformers' own warpers.)"""
    logits = logits.float() / temperature
    if top_k:  # 0 or None: every token
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return logits.softmax(-1)


def pick_tokens(
    logits: Tensor,
    temperature: float | None,
    top_k: int | None,
    generators: list[torch.Generator] | None = None,
) -> Tensor:
    """Greedy (no temperature) or sampled choice per row of ``(B, V)`` logits
    (:func:`sampling_probs`)."""
    if temperature is None or temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    return draw_tokens(sampling_probs(logits, temperature, top_k), generators)


def draw_tokens(probs: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
    """One token per row of ``(B, V)`` probabilities, each row from its own
    generator when given (else torch's)."""
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    return torch.stack(
        [torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators, strict=True)]
    )
