"""The contract every model adapter follows.

An adapter is an ``nn.Module`` (so Captum's methods and ``BaseLLMAttribution``
accept it) with ``.device`` and ``.tokenizer``, that can

- ``encode`` a chat into an :class:`~captum_mllm.encoding.EncodedChat`,
- ``prefill`` a prefix no feature touches, once per explanation,
- ``score`` a batch of coalitions against a target in one teacher-forced forward,
- ``generate_batch`` greedy continuations of a batch of coalitions.

It counts its model forwards in ``n_forward_calls``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import TargetError


class ModelAdapter(nn.Module):
    """Base class of model adapters. See the module docstring for the contract."""

    tokenizer: Any

    def __init__(self) -> None:
        super().__init__()
        self.n_forward_calls = 0

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @abstractmethod
    def encode(self, chat: Any) -> EncodedChat:
        """Encode a chat (a :class:`Chat` or a message list) with generation prompt."""

    @abstractmethod
    def score_masked(
        self, masked: MaskedChat, target: Tensor, prefix: Any = None, per_step: bool = False
    ) -> Tensor:
        """Log-probabilities of ``target`` after each coalition.

        Args:
            masked (MaskedChat): B coalitions of one chat.
            target (Tensor): ``(T,)`` target token ids.
            prefix (Any, optional): state from :meth:`prefill` of the first
                ``masked.prefix_len`` positions.
            per_step (bool, optional): score one target token per forward
                (Captum's ``forward_in_tokens=True``); same values, slower.

        Returns:
            Tensor: ``(B, T)`` log-probabilities.
        """

    def prefill(self, masked: MaskedChat) -> Any:
        """Run the untouched prefix once; None when the adapter cannot reuse it."""
        return None

    @abstractmethod
    def generate_masked(self, masked: MaskedChat, **gen_args: Any) -> list[Tensor]:
        """Greedy (or sampled) continuation of each coalition: B id tensors."""

    @abstractmethod
    def decode_tokens(self, ids: Tensor) -> list[str]:
        """Readable label of each output token."""

    @abstractmethod
    def decode_response(self, ids: Tensor) -> str:
        """A whole response as text."""

    @abstractmethod
    def strip_response(self, ids: Tensor) -> Tensor:
        """A response without its trailing end-of-turn, end-of-sequence and padding tokens."""

    @property
    def vocab_size(self) -> int | None:
        """Number of token ids the model reads (None when unknown)."""
        size = getattr(self.tokenizer, "vocab_size", None)
        return len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else size

    def check_target(self, target: Tensor) -> Tensor:
        """A user-given target as ``(T,)`` token ids.

        Args:
            target (Tensor): integer ids of shape ``(T,)`` or ``(1, T)`` (the shape
                of ``tokenizer(..., return_tensors="pt").input_ids``).

        Returns:
            Tensor: ``(T,)`` long ids.

        Raises:
            TargetError: another shape, non-integer values or ids outside the vocabulary.
        """
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TargetError(
                f"target ids must be integers, got {target.dtype}; pass token ids or a str"
            )
        if target.dim() == 2 and target.shape[0] == 1:
            target = target[0]
        if target.dim() != 1:
            raise TargetError(f"target ids must be (T,) or (1, T), got {tuple(target.shape)}")
        size = self.vocab_size
        bad = (target < 0) | (target >= size) if size is not None else target < 0
        if bool(bad.any()):
            raise TargetError(
                f"target ids {target[bad].tolist()[:5]} are outside the vocabulary "
                f"(0..{size - 1 if size else '?'})"
            )
        return target.long()

    def output_audio(self, target: Tensor) -> dict[str, Any] | None:
        """The spoken part of a response (codes, waveform); None for text models."""
        return None
