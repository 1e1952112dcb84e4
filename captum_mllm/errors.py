"""Exceptions of captum-mllm: one class per condition, all ``ValueError``s.

Every message says what was wrong and what to do about it.
"""

import contextlib
import math
import numbers
import os
import sys
import warnings
from types import FrameType

#: Frames a warning of :func:`warn_caller` never points at: this package's, and
#: contextlib's (decorators such as ``retained_heap`` run the call from there).
_LIBRARY_FILES = (os.path.dirname(__file__) + os.sep, contextlib.__file__)


class CaptumMLLMError(ValueError):
    """Base class of every error raised by captum-mllm for bad input."""


class InvalidRoleError(CaptumMLLMError):
    """A turn's role is not one of ``system``, ``user`` or ``assistant``."""


class EmptyChatError(CaptumMLLMError):
    """The chat has no turns, or a turn has no parts."""


class EmptyTextError(CaptumMLLMError):
    """A text part is empty or only whitespace."""


class InvalidContentError(CaptumMLLMError):
    """A part is not text or audio, or its value has the wrong type."""


class AudioError(CaptumMLLMError):
    """Audio could not be read, is empty, or is too short for the model."""


class NoFeaturesError(CaptumMLLMError):
    """No interpretable feature is left after the roles, units and filters."""


class InvalidGroupsError(CaptumMLLMError):
    """``groups=`` does not give one group id per feature."""


class UnsupportedInputError(CaptumMLLMError):
    """The input or method is not one that MultimodalLLMAttribution accepts."""


class TargetError(CaptumMLLMError):
    """The attribution target is empty or of the wrong type."""


class PlotError(CaptumMLLMError):
    """A plot was asked of a result that lacks what it draws (audio, a turn, a row)."""


class ModelNotInstalledError(CaptumMLLMError):
    """A model's package or file is not installed (the message gives the install command)."""


class ChatTemplateError(CaptumMLLMError):
    """The chat template renders the chat in a way its parts cannot be located in."""


class InvalidOptionError(CaptumMLLMError):
    """An argument is outside its documented choices or range.

    Examples::

        >>> ChatInput(chat, model, text_unit="words")
        InvalidOptionError: text_unit must be one of (..., 'word', ...), got 'words'
    """


def require_int(name: str, value: object, low: int) -> int:
    """``value`` as an int of at least ``low`` (numpy ints too; not bools or floats).

    Raises:
        InvalidOptionError: it is not one.
    """
    if not is_int(value) or value < low:  # type: ignore[operator]
        raise InvalidOptionError(f"{name} must be an int of at least {low}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def is_int(value: object) -> bool:
    """An int, numpy's too; not a bool (``True`` indexes as 1, ``1.0`` not at all)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_built(method: object) -> None:
    """A Captum method is passed built on the model, not as its class.

    Raises:
        UnsupportedInputError: it is a class (an AttributeError or "type is not
            supported" came from deeper inside, naming neither).
    """
    if isinstance(method, type):
        raise UnsupportedInputError(
            f"pass the method built on the model, {method.__name__}(model), not the class"
        )


def require_real(
    name: str, value: object, above: float = -math.inf, at_least: bool = False
) -> float:
    """``value`` as a finite float above ``above`` (or equal to it when
    ``at_least``); not bools, strings or NaN.

    Raises:
        InvalidOptionError: it is not one.
    """
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if real else math.nan  # type: ignore[arg-type]
    if not (math.isfinite(number) and (number >= above if at_least else number > above)):
        bound = "" if above == -math.inf else f" {'>=' if at_least else 'above'} {above:g}"
        raise InvalidOptionError(f"{name} must be a finite number{bound}, got {value!r}")
    return number


class InvalidBaselineError(CaptumMLLMError):
    """A text or audio baseline is unknown, out of the vocabulary, or a special token."""


class InvalidSpanError(CaptumMLLMError):
    """An audio span is reversed, empty or outside its clip."""


class AlignmentError(CaptumMLLMError):
    """Forced alignment cannot run: no aligner, wrong transcripts, unknown characters."""


class InvalidModelError(CaptumMLLMError):
    """The model is not a captum-mllm adapter, or lacks what the adapter needs."""


class EmptyCoalitionError(CaptumMLLMError):
    """A coalition removed every input position, so the model has nothing to read."""


class StoreMismatchError(CaptumMLLMError):
    """A coalition store file holds another explanation (model, chat, features,
    target or seed differ); the message names what differs."""


class ResultFormatError(CaptumMLLMError):
    """A saved result cannot be read: missing files, another schema, or bad data."""


class AdapterCheckError(CaptumMLLMError):
    """A model adapter breaks the adapter contract (``check_adapter`` says how)."""


class SynthesisError(CaptumMLLMError):
    """espeak-ng (used to make the demo's training speech) is missing or failed."""


class OutOfMemoryError(CaptumMLLMError, MemoryError):
    """Even one coalition does not fit in memory (after halving the batch down to
    one); the message gives the sizes involved."""


class InconsistentVersionWarning(UserWarning):
    """A saved result is read by another version of captum-mllm than wrote it."""


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn at the user's line that called into the library, however deep the call.
    (``warnings.warn``'s own ``skip_file_prefixes`` does not skip contextlib's
    frames on Python 3.12.1.)"""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_FILES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
