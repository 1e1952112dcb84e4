"""The untouched prefix's cache: computed once per explanation, expanded over
each batch of coalitions (hybrid models' convolution and recurrent states
too), with the full chat's next positions that rows beginning alike read
from it, and the keyword transformers uses for it."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from captum_mllm.models.batching import ints, lengths, to_device


def cache_kwarg(forward: Callable[..., Any] | None) -> str:
    """The key/value cache keyword of a model's forward: transformers >= 5.2x
    calls it ``cache``, older versions ``past_key_values``."""
    params = inspect.signature(forward).parameters if forward is not None else {}
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class PrefixCache:
    """The model's cache of the positions no feature touches, computed once per
    explanation and expanded over each batch of coalitions.

    Attributes:
        length (int): prefix positions.
        cache: the model's cache after them (key/value and, for LFM2's hybrid
            layers, convolution states).
        last (Tensor): what the last prefix position predicts the first response
            token from (logits or a hidden state), for coalitions that keep
            nothing after the prefix.
        shared (Tensor): ids (on the host) of the full chat's positions the
            cache also holds after the prefix. A coalition's row that begins
            with some of them reads those from the cache instead of pushing
            them again; what a position holds depends only on the positions
            before it, so the values are the same (empty: nothing shared).
    """

    length: int
    cache: Any
    last: Tensor
    shared: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def reading(self, leads: list[int], width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """For rows that begin with ``leads`` shared positions and are pushed
        ``width`` wide: the cache part of their attention mask ``(B, length +
        len(shared))`` (each row sees the prefix and the shared positions it
        begins with) and their position ids ``(B, width)``."""
        lead = ints(leads)
        seen = torch.arange(self.length + len(self.shared))[None] < (self.length + lead)[:, None]
        start = to_device(self.length + lead, device)
        return to_device(seen.long(), device), start[:, None] + torch.arange(width, device=device)

    def leads(self, rows: list[Tensor]) -> list[int]:
        """How many of each row's first positions are :attr:`shared`'s, never
        the row's last (so every row pushes at least one). A pure function of
        the row, so a coalition's value never depends on its batch."""
        k = len(self.shared)
        if k == 0 or not rows:
            return [0] * len(rows)
        # The first k ids of every row at once, read from the rows laid end to end.
        lens = ints(lengths(rows))
        flat = torch.cat([*rows, self.shared.new_full((k,), -1)])
        starts = torch.cumsum(lens, 0) - lens
        head = flat[starts[:, None] + torch.arange(k)[None]]  # past a row's end: not its ids,
        head = head.masked_fill(torch.arange(k)[None] >= lens[:, None], -1)  # so masked (-1)
        same = (head == self.shared).long().cumprod(1).sum(1)
        return torch.minimum(same, (lens - 1).clamp(min=0)).tolist()

    @staticmethod
    def expandable(cache: Any) -> bool:
        """Whether :meth:`expand` knows how to repeat this cache over a batch."""
        layers = getattr(cache, "layers", None)
        if layers is None:
            return hasattr(cache, "batch_repeat_interleave")
        return all(
            hasattr(layer, "batch_repeat_interleave") or hasattr(layer, "conv_states")
            for layer in layers
        )

    def expand(self, batch_size: int) -> Any:
        """A fresh copy for ``batch_size`` rows (the model appends to the cache it
        is given). transformers' ``batch_repeat_interleave`` repeats keys and values
        only: the convolution and recurrent states of hybrid models' layers are
        repeated here."""
        if getattr(self.cache, "layers", None) is None:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(batch_size)
            return cache
        # New cache and layer objects over the same tensors: repeating replaces
        # every state tensor, so the prefix's own are never written (a deep copy
        # would copy them only to drop the copies).
        cache = copy.copy(self.cache)
        cache.layers = layers = [_fresh_containers(layer) for layer in self.cache.layers]
        for layer in layers:
            if hasattr(layer, "batch_repeat_interleave"):  # keys and values only
                layer.batch_repeat_interleave(batch_size)
            # a hybrid layer (Falcon-H1's) holds both: its states are repeated too
            for name in ("conv_states", "recurrent_states"):
                states = getattr(layer, name, {})
                for i, state in states.items():
                    if state is not None:
                        states[i] = state.repeat_interleave(batch_size, dim=0)
        return cache


def _fresh_containers(obj: Any) -> Any:
    """A shallow copy of ``obj`` whose dict and list attributes are new containers."""
    new = copy.copy(obj)
    for name, value in vars(obj).items():
        if isinstance(value, dict | list):
            setattr(new, name, copy.copy(value))
    return new


def shares(prefix: Any) -> bool:
    """Whether a prefix (an adapter's own kind) holds shared positions."""
    return isinstance(prefix, PrefixCache) and len(prefix.shared) > 0
