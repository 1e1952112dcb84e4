"""Exceptions of captum-mllm: one class per condition, all ``ValueError``s.

Every message says what was wrong and what to do about it.
"""


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
