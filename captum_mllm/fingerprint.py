"""Fingerprints: digests naming one explanation, for the coalition store.

Two runs share stored values only when every part matches: the model
(class, configuration and weights), the chat (text and audio samples, and
the token ids its template gives), the features (positions and baselines),
the target (its settings and the answer explained) and the seed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import os
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_mllm.chat import AudioPart, Chat
from captum_mllm.errors import InvalidModelError


def digest(*parts: Any) -> str:
    """SHA-256 of plain data (JSON-able values, bytes and tensors), hex."""
    return _digest(parts)


def _digest(parts: Iterable[Any]) -> str:
    """:func:`digest` of parts taken one at a time (weights read one by one)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(str(part.dtype).encode() + str(tuple(part.shape)).encode())
            # the bytes as they lie, not a copy (tobytes() doubled the time on weights)
            h.update(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


#: Models whose weights nothing changes while they live (a worker's own replica),
#: with their digest once computed.
_FIXED: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def fix_digest(model: Any) -> None:
    """Compute ``model``'s :func:`model_digest` once from now on: for a model
    nothing changes while it lives, such as a data set worker's replica, which
    otherwise read every weight again for each chat (seconds a chat for a
    billion-parameter model, more than a small budget's explanation)."""
    if isinstance(model, nn.Module):
        _FIXED.setdefault(model, None)


def model_digest(model: nn.Module) -> str:
    """The model's class, its configuration, its generation configuration
    (sampled answers read it) and every weight."""
    if model in _FIXED:
        known = _FIXED[model]
        if known is None:
            known = _FIXED[model] = _model_digest(model)
        return known
    return _model_digest(model)


def _model_digest(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    config_text = to_json() if callable(to_json) else repr(config)
    to_dict = getattr(getattr(model, "generation_config", None), "to_diff_dict", None)
    generation = to_dict() if callable(to_dict) else {}
    generation.pop("transformers_version", None)  # the same settings under another release
    state = model.state_dict()
    head = [type(model).__qualname__, config_text, plain(generation), *state.keys()]
    return _digest(itertools.chain(head, _weights(model, state)))


def _weights(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
    """The state's tensors in order; those accelerate offloaded (``device_map``
    with disk or CPU offload: a meta tensor here) read from where it keeps
    them, one at a time, so the digest is the in-memory model's."""
    loader = None
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_meta:
            loader = loader if loader is not None else _offloaded(model)
            if loader is None:
                raise InvalidModelError(
                    f"the model's {key} has no data (meta device) and no offloaded copy "
                    "accelerate keeps: load the model's weights before explaining it"
                )
            value = loader[key]
        yield from _tensor_parts(value)


def _tensor_parts(value: Any) -> Iterator[Any]:
    """A state-dict entry as parts :func:`_digest` reads: a quantized model's
    weights (torch.ao's quantized tensors, torchao's tensor subclasses, whose
    bytes cannot be viewed) by what they hold, other entries (a packed
    parameter's tuple, a dtype) item by item."""
    if isinstance(value, torch.Tensor):
        if value.is_quantized:  # torch.ao: the real values its integers stand for
            yield value.dequantize()
        elif type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            names, context = value.__tensor_flatten__()  # torchao: its inner tensors
            yield [_qualname(type(value)), plain(context)]
            for name in names:
                yield from _tensor_parts(getattr(value, name))
        else:
            yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensor_parts(item)
    else:
        yield plain(value)


def _offloaded(model: nn.Module) -> Any:
    """accelerate's loader of a dispatched model's offloaded weights (keyed by
    state-dict name), or None."""
    for module in model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is not None and hasattr(weights, "dataset"):
            return weights.dataset
    return None


def chat_digest(chat: Chat) -> str:
    """Every turn's role, text, audio samples and other message keys."""
    parts: list[Any] = []
    for turn in chat:
        parts.append(turn.role)
        if turn.extra:  # a tool call's arguments, which the template renders
            parts.append(plain(dict(turn.extra), depth=8))
        for part in turn.parts:
            if isinstance(part, AudioPart):
                parts += [part.sample_rate, part.waveform]
            else:
                parts.append(part.text)
    return digest(*parts)


def plain(value: Any, depth: int = 4) -> Any:
    """``value`` as plain data for :func:`digest`, the same in every process:
    JSON-able values as they are (containers item by item), tensors and arrays
    by their digest, torch modules by :func:`model_digest` (so a bound method
    of another embedding model differs), functions, classes and
    ``functools.partial`` by their names, the constants and closure values
    they hold (so a lambda loading another checkpoint differs), other objects
    by their type's name (a repr may hold a memory address)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if depth == 0:
        return _qualname(type(value))
    if isinstance(value, list | tuple):
        return [plain(v, depth - 1) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v, depth - 1) for k, v in value.items()}
    if isinstance(value, torch.Tensor | np.ndarray):
        return digest(torch.as_tensor(value))
    if isinstance(value, nn.Module):  # e.g. an embedding model's: its weights, not its class
        return ["module", model_digest(value)]
    if isinstance(value, functools.partial):
        return ["partial", *(plain(v, depth - 1) for v in (value.func, value.args, value.keywords))]
    if inspect.ismethod(value):
        return ["method", plain(value.__self__, depth - 1), value.__func__.__qualname__]
    if isinstance(value, type) or inspect.isbuiltin(value):
        return _qualname(value)
    code = getattr(value, "__code__", None)
    if code is not None:
        consts = [c for c in code.co_consts if c is None or isinstance(c, bool | int | float | str)]
        cells = [plain(c.cell_contents, depth - 1) for c in value.__closure__ or ()]
        return ["function", _qualname(value), consts, list(code.co_names), cells]
    return _qualname(type(value))


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
