"""captum-mllm: Shapley explanations of multimodal chat models, inside Captum."""

from captum_mllm.attribution import CoalitionCache, MultimodalLLMAttribution
from captum_mllm.chat import AudioPart, Chat, TextPart, Turn
from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.inputs import ChatInput, FeatureInfo
from captum_mllm.models import HFCausalLMAdapter, LFM2AudioAdapter, ModelAdapter
from captum_mllm.result import MultimodalLLMAttributionResult
from captum_mllm.targets import EmbeddingSimilarity, LogProbTarget

__all__ = [
    "AudioPart",
    "Chat",
    "ChatInput",
    "CoalitionCache",
    "EmbeddingSimilarity",
    "EncodedChat",
    "FeatureInfo",
    "HFCausalLMAdapter",
    "LFM2AudioAdapter",
    "LogProbTarget",
    "MaskedChat",
    "ModelAdapter",
    "MultimodalLLMAttribution",
    "MultimodalLLMAttributionResult",
    "TextPart",
    "Turn",
]
