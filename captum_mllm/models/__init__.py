"""Model adapters: one file per model family."""

from captum_mllm.models.base import ModelAdapter
from captum_mllm.models.hf_causal import HFCausalLMAdapter

__all__ = ["ModelAdapter", "HFCausalLMAdapter"]
