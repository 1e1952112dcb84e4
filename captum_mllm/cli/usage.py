"""What the command line accepts: its one-line error, and its flags' types
(checked before a model loads)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from captum_mllm.audio_units import ALIGNED_UNITS
from captum_mllm.errors import CaptumMLLMError


class UsageError(CaptumMLLMError):
    """A command-line mistake: reported in one line, exit code 2 (one of
    captum-mllm's errors, so a Ray worker's reaches the command line whole)."""


def audio_unit_value(text: str) -> Any:
    if text in ("frame", "turn", *ALIGNED_UNITS):
        return text
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"--audio-unit must be frame, turn, word, sentence or seconds, got {text!r}"
        ) from None


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number is needed, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"a number above 0 is needed, got {text!r}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``, checked before
    a model loads (a 1.5B model takes a while to refuse ``--budget 0``)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number is needed, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum} is needed, got {value}")
        return value

    return whole


def device_name(text: str) -> str:
    """An argparse type: a device torch knows (a typo was found only once the
    model had loaded, or the default model had been converted)."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"not a device: {text!r} (cpu, cuda, cuda:1, mps, ...)"
        ) from None
    return text


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (argparse turns the error into exit 2)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
    return value
