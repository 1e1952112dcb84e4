"""captum-mllm: Shapley explanations of multimodal chat models, inside Captum.

The names below are imported on first use (PEP 562), as transformers' are: the
command line's ``--help`` and its usage errors need no torch, transformers or
Captum, which take seconds to import.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("captum-mllm")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:  # what type checkers and editors read; at run time, __getattr__
    from captum_mllm.agreement import compare
    from captum_mllm.attention import AttentionAttribution
    from captum_mllm.attribution import MultimodalLLMAttribution
    from captum_mllm.audio import ClipRef
    from captum_mllm.chat import AudioPart, Chat, TextPart, Turn
    from captum_mllm.chat_features import FeatureInfo
    from captum_mllm.coalitions import (
        CoalitionEvaluator,
        CoalitionStore,
        MemoryStore,
        SQLiteStore,
    )
    from captum_mllm.contrastive import ContrastiveTarget
    from captum_mllm.dataset_tables import dataset_attributions
    from captum_mllm.distributed import explain_dataset, explain_sharded
    from captum_mllm.encoding import EncodedChat, MaskedChat
    from captum_mllm.gradient import MultimodalLLMGradientAttribution
    from captum_mllm.heap import release_heap, retained_heap
    from captum_mllm.inputs import ChatInput
    from captum_mllm.models import (
        HFCausalLMAdapter,
        LFM2AudioAdapter,
        ModelAdapter,
        Response,
        load_default_model,
    )
    from captum_mllm.result import MultimodalLLMAttributionResult
    from captum_mllm.targets import EmbeddingSimilarity, LogProbTarget, Target, TargetValues

#: The module of captum_mllm that holds each public name (as the imports above).
_NAMES = {
    "agreement": ("compare",),
    "attention": ("AttentionAttribution",),
    "audio": ("ClipRef",),
    "attribution": ("MultimodalLLMAttribution",),
    "chat": ("AudioPart", "Chat", "TextPart", "Turn"),
    "chat_features": ("FeatureInfo",),
    "contrastive": ("ContrastiveTarget",),
    "coalitions": ("CoalitionEvaluator", "CoalitionStore", "MemoryStore", "SQLiteStore"),
    "dataset_tables": ("dataset_attributions",),
    "distributed": ("explain_dataset", "explain_sharded"),
    "encoding": ("EncodedChat", "MaskedChat"),
    "gradient": ("MultimodalLLMGradientAttribution",),
    "heap": ("release_heap", "retained_heap"),
    "inputs": ("ChatInput",),
    "models": (
        "HFCausalLMAdapter",
        "LFM2AudioAdapter",
        "ModelAdapter",
        "Response",
        "load_default_model",
    ),
    "result": ("MultimodalLLMAttributionResult",),
    "targets": ("EmbeddingSimilarity", "LogProbTarget", "Target", "TargetValues"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = [
    "AttentionAttribution",
    "AudioPart",
    "Chat",
    "ChatInput",
    "ClipRef",
    "CoalitionEvaluator",
    "CoalitionStore",
    "ContrastiveTarget",
    "EmbeddingSimilarity",
    "EncodedChat",
    "FeatureInfo",
    "HFCausalLMAdapter",
    "LFM2AudioAdapter",
    "LogProbTarget",
    "MaskedChat",
    "MemoryStore",
    "ModelAdapter",
    "MultimodalLLMAttribution",
    "MultimodalLLMAttributionResult",
    "MultimodalLLMGradientAttribution",
    "Response",
    "SQLiteStore",
    "Target",
    "TargetValues",
    "TextPart",
    "Turn",
    "compare",
    "dataset_attributions",
    "explain_dataset",
    "explain_sharded",
    "load_default_model",
    "release_heap",
    "retained_heap",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:  # a submodule (captum_mllm.demo) is imported by the import system
        raise AttributeError(f"module 'captum_mllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"captum_mllm.{module}"), name)
    globals()[name] = value  # found once; later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
