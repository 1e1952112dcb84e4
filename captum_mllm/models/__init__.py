"""Model adapters: one file per model family."""

from captum_mllm.models.base import ModelAdapter, Response
from captum_mllm.models.default_model import load_default_model
from captum_mllm.models.hf_causal import HFCausalLMAdapter
from captum_mllm.models.lfm2_audio import LFM2AudioAdapter

__all__ = [
    "HFCausalLMAdapter",
    "LFM2AudioAdapter",
    "ModelAdapter",
    "Response",
    "load_default_model",
]
