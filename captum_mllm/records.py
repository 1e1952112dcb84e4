"""What an explanation records besides its values: the coalition store,
opened under the explanation's fingerprint (a store never mixes two
explanations' coalitions) and replaying its first run's draws, the
provenance, and what a result keeps of a chat input."""

from __future__ import annotations

import json
import os
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from captum.attr import InterpretableInput, Lime, PerturbationAttribution, ShapleyValueSampling
from torch import Tensor

from captum_mllm.audio import ClipRef
from captum_mllm.chat import AudioPart
from captum_mllm.coalitions import CoalitionStore, SQLiteStore
from captum_mllm.errors import InvalidOptionError, StoreMismatchError, is_int
from captum_mllm.fingerprint import chat_digest, digest, model_digest, plain
from captum_mllm.inputs import ChatInput
from captum_mllm.method_args import is_scalar, method_settings
from captum_mllm.methods import ShapleyEstimator
from captum_mllm.models.base import Response

if TYPE_CHECKING:
    from captum_mllm.attribution import MultimodalLLMAttribution


def open_store(
    attribution: MultimodalLLMAttribution,
    store: str | PathLike[str] | CoalitionStore,
    inp: InterpretableInput,
    response: Response,
) -> CoalitionStore:
    """The store a path names (a SQLite file, made or reopened under this
    explanation's :func:`fingerprint`, which refuses another's), or a store
    object given, checked against the fingerprint its first explanation left."""
    digests = fingerprint(attribution, inp, response)
    if isinstance(store, CoalitionStore):  # e.g. a MemoryStore kept between calls
        named = json.dumps(digests, sort_keys=True)
        if store.first("fingerprint", named) != named:  # keys are coalitions alone
            raise StoreMismatchError(
                "this store holds another explanation's coalitions; use a new store for "
                "each explanation"
            )
        return store
    return SQLiteStore(Path(store), digests)


def replay_draws(
    method: PerturbationAttribution, store: CoalitionStore, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Make a rerun on a store draw the coalitions its first run drew, so that
    it resumes rather than starts over: our estimators without ``seed=`` get
    the first run's seed; for Captum's samplers torch's generator is set to
    its state when the first run began."""
    if isinstance(method, ShapleyEstimator):
        if kwargs.get("seed") is None:
            drawn = str(int(torch.randint(0, 2**31 - 1, (1,)).item()))
            return {**kwargs, "seed": int(store.first("seed", drawn))}
        return kwargs
    if not isinstance(method, ShapleyValueSampling | Lime):  # they draw nothing
        return kwargs
    state = torch.get_rng_state()
    first = store.first("torch_rng_state", state.numpy().tobytes().hex())
    torch.set_rng_state(torch.from_numpy(np.frombuffer(bytes.fromhex(first), np.uint8).copy()))
    return kwargs


def fingerprint(
    attribution: MultimodalLLMAttribution, inp: InterpretableInput, response: Response
) -> dict[str, str]:
    """Digests of what a coalition's value depends on (see :mod:`captum_mllm.fingerprint`)."""
    module = getattr(attribution.adapter, "model", attribution.adapter)
    if isinstance(inp, ChatInput):
        # The ids as well: the tokenizer's chat template is not in the model's digest.
        chat = digest(chat_digest(inp.prompt), inp.encoded.input_ids)
        fill = inp.audio_fill if inp.audio_fill is not None else "zeros"
        features = digest(
            [(f.label, f.positions) for f in inp.features],
            [inp.baseline, inp.replace_id, inp.audio_baseline],
            fill,
        )
    else:  # Captum's inputs: their values, baselines, mask and skipped tokens
        prompt = inp.to_model_input()
        chat = digest(prompt if isinstance(prompt, Tensor) else str(prompt))
        features = digest(plain(vars(inp)))
    settings = attribution.value_fn.settings()
    return {
        "model": model_digest(module),
        "chat": chat,
        "features": features,
        "target": digest(
            type(attribution.value_fn).__name__, attribution.value_fn.fingerprint(), response.ids
        ),
        "seed": digest(settings.get("seed")),
    }


def provenance(
    attribution: MultimodalLLMAttribution,
    inp: InterpretableInput,
    per_step: bool,
    method_args: dict[str, Any],
    store: Any,
    gen_args: dict[str, Any] | None,
) -> dict[str, Any]:
    """How a result was computed: adapter, model, method and its scalar
    arguments, target, input settings, generation settings and store."""
    module = getattr(attribution.adapter, "model", attribution.adapter)
    config = getattr(module, "config", None)
    return {
        "adapter": type(attribution.adapter).__name__,
        "model": type(module).__name__,
        "model_name": getattr(config, "_name_or_path", None) or None,
        "method": type(attribution.attr_method).__name__,
        "method_settings": method_settings(attribution.attr_method),
        "method_args": {k: v for k, v in method_args.items() if is_scalar(v)},
        "target": {"class": type(attribution.value_fn).__name__, **attribution.value_fn.settings()},
        "input": type(inp).__name__,
        "input_settings": inp.settings() if isinstance(inp, ChatInput) else None,
        "forward_in_tokens": per_step,
        "gen_args": {k: v for k, v in (gen_args or {}).items() if is_scalar(v)},
        "store": str(store) if isinstance(store, str | PathLike) else None,
    }


def chat_fields(inp: ChatInput) -> dict[str, Any]:
    """What a result keeps of a chat input: features, roles, segments, clips."""
    return {
        "features": inp.features,
        "roles": [t.role for t in inp.prompt],
        "segments": inp.segments(),
        "clips": _clips(inp),
    }


def _clips(inp: ChatInput) -> list[ClipRef]:
    """The prompt's audio clips, with the file each came from when it has one
    (absolute: a result saved without its audio was read from another folder)."""
    out = []
    for t, turn in enumerate(inp.prompt):
        for part in turn.parts:
            if isinstance(part, AudioPart):
                path = part.source if part.source and Path(part.source).is_file() else None
                path = os.path.abspath(path) if path is not None else None
                out.append(ClipRef(t, part.sample_rate, part.waveform, path))
    return out


def check_store_arguments(
    store: str | PathLike[str] | CoalitionStore | None,
    shard: Any,
    cache_coalitions: bool,
    drawn_baselines: bool,
    num_trials: int,
    target_stderr: Any,
) -> None:
    """Refuse a store or shard that cannot work, before the answer is generated."""
    if store is not None and not cache_coalitions:  # the store went unread and unwritten
        raise InvalidOptionError(
            "store= keeps each distinct coalition once, which cache_coalitions=False turns off"
        )
    if isinstance(store, str | PathLike) and Path(store).is_dir():  # before the answer
        raise StoreMismatchError(
            f"{store} is a folder, not a coalition store: name a file in it, e.g. "
            f"{Path(store) / 'run.sqlite'}"
        )
    if drawn_baselines and store is not None and num_trials > 1:
        raise InvalidOptionError(
            "a store keeps one value per coalition, and each trial draws the input's "
            "baselines anew: give num_trials=1 with store=, or no store"
        )
    if shard is not None and not (
        isinstance(shard, tuple | list)
        and len(shard) == 2
        and all(is_int(i) for i in shard)
        and 0 <= shard[0] < shard[1]
    ):  # another index evaluated no coalition, without a word
        raise InvalidOptionError(
            f"shard must be (index, count) with 0 <= index < count, got {shard!r}"
        )
    if shard is not None and (store is None or target_stderr is not None):
        raise InvalidOptionError(
            "shard= needs a store= to fill and a method that does not stop on values "
            "(no target_stderr)"
        )
