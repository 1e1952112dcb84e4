"""Loading a Hugging Face chat model and its tokenizer for
``HFCausalLMAdapter.from_pretrained``: where the files come from (shared by
both), the dtype and device defaults, and the image-text class of a
vision-language model that has no causal-LM one."""

from __future__ import annotations

from typing import Any

import torch

from captum_mllm.errors import InvalidOptionError
from captum_mllm.models.chat_templates import HUB_KWARGS, processor_template
from captum_mllm.models.decoder import resolve_device


def load_pretrained(
    name_or_path: str,
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
    trust_remote_code: bool,
    gguf_file: str | None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``(model, tokenizer)``, the model on ``device`` (see ``from_pretrained``)."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    # Where the checkpoint comes from: its tokenizer's files too (another revision's vocabulary)
    common.update({k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs})
    torch_dtype = kwargs.pop("torch_dtype", None)  # transformers' old name: ours won over it
    if torch_dtype is not None:
        if dtype is not None:
            raise InvalidOptionError("give dtype= or torch_dtype= (its old name), not both")
        dtype = torch_dtype
    dispatched = kwargs.get("device_map") is not None
    if dispatched and device is not None:  # one would undo the other
        raise InvalidOptionError("give device= or device_map=, not both")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    if getattr(tokenizer, "chat_template", None) is None:  # a processor's, in its own file
        tokenizer.chat_template = processor_template(name_or_path, common)
    where = resolve_device(device)
    if dtype is None:
        dtype = torch.float32 if where.type == "cpu" else "auto"
    config = type(AutoConfig.from_pretrained(name_or_path, **common))
    auto: Any = AutoModelForCausalLM
    # A vision-language chat model (Qwen2.5-VL, Llava) has no causal-LM class:
    # its image-text one reads text chats. AutoModelForCausalLM refused it.
    if config not in MODEL_FOR_CAUSAL_LM_MAPPING:
        if config in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            auto = AutoModelForImageTextToText
    model = auto.from_pretrained(name_or_path, dtype=dtype, **common, **kwargs)
    if not dispatched:  # accelerate placed a dispatched model's layers (device_map="auto")
        model.to(where)  # type: ignore[arg-type]
    return model.eval(), tokenizer
