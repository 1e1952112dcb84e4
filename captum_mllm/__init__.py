"""captum-mllm: Shapley explanations of multimodal chat models, inside Captum."""

from captum_mllm.attribution import MultimodalLLMAttribution
from captum_mllm.chat import AudioPart, Chat, TextPart, Turn
from captum_mllm.coalitions import CoalitionEvaluator, CoalitionStore, MemoryStore, SQLiteStore
from captum_mllm.distributed import dataset_attributions, explain_dataset, explain_sharded
from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.gradient import AttentionAttribution, MultimodalLLMGradientAttribution, compare
from captum_mllm.heap import release_heap, retained_heap
from captum_mllm.inputs import ChatInput, FeatureInfo
from captum_mllm.models import (
    HFCausalLMAdapter,
    LFM2AudioAdapter,
    ModelAdapter,
    Response,
    load_default_model,
)
from captum_mllm.result import ClipRef, MultimodalLLMAttributionResult
from captum_mllm.targets import EmbeddingSimilarity, LogProbTarget, Target, TargetValues

__all__ = [
    "AttentionAttribution",
    "AudioPart",
    "Chat",
    "ChatInput",
    "ClipRef",
    "CoalitionEvaluator",
    "CoalitionStore",
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
