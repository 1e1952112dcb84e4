"""The model the command line explains, from its flags: a hub id, a folder, a
GGUF file, the embedded default or a tiny test model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from captum_mllm.cli.usage import UsageError

TINY_MODELS = ("tiny-llama", "tiny-lfm2-audio", "demo-speech")


def model_factory(args: argparse.Namespace) -> Any:
    """``() -> adapter`` from the model flags (picklable: sent to Ray workers)."""
    from functools import partial

    flags = ("model", "adapter", "device", "dtype", "trust_remote_code", "chat_template_kwargs")
    return partial(load_model, *(getattr(args, flag) for flag in flags))


def load_model(
    name: str,
    adapter: str | None,
    device: str | None,
    dtype: str | None,
    trust_remote_code: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Any:
    from captum_mllm import HFCausalLMAdapter

    model = _loaded(name, adapter, device, dtype, trust_remote_code)
    if chat_template_kwargs is not None:
        if not isinstance(model, HFCausalLMAdapter):  # LFM2-Audio's layout is its own
            raise UsageError("--chat-template-kwargs is for Hugging Face chat models")
        model.chat_template_kwargs = chat_template_kwargs
    return model


def _loaded(
    name: str, adapter: str | None, device: str | None, dtype: str | None, trust_remote_code: bool
) -> Any:
    import torch

    from captum_mllm import HFCausalLMAdapter, LFM2AudioAdapter, load_default_model
    from captum_mllm.models.decoder import resolve_device

    torch_dtype = getattr(torch, dtype) if dtype else None
    path = Path(name)
    if name.startswith("~"):  # a quoted path the shell did not expand
        name, path = str(path.expanduser()), path.expanduser()
    kind = adapter or _guess_adapter(name)
    # A GPU this machine lacks is refused before the weights load (or the default
    # model's conversion); checked where the model loads, as a Ray worker's GPU counts.
    resolve_device(device)
    try:
        if name == "default":
            return load_default_model(device=device, dtype=torch_dtype)
        if name in TINY_MODELS:  # float32 on the CPU unless --device / --dtype say (unread)
            return _tiny_model(name).to(device=device, dtype=torch_dtype)
        if name.startswith((".", "/")) and not path.exists():
            raise UsageError(f"no model folder or file at {name}")  # not a hub id's rules
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UsageError(f"no GGUF file at {path}")
            return HFCausalLMAdapter.from_pretrained(
                str(path.parent), gguf_file=path.name, device=device, dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
            )  # fmt: skip
        if kind == "lfm2-audio":
            return LFM2AudioAdapter.from_pretrained(name, device=device, dtype=torch_dtype)
        return HFCausalLMAdapter.from_pretrained(
            name, device=device, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except UsageError:
        raise
    except Exception as exc:  # hub and loading errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load model {name!r}: {first}") from None


def _tiny_model(name: str) -> Any:
    from captum_mllm import LFM2AudioAdapter, testing

    if name == "tiny-llama":
        return testing.tiny_hf_adapter()
    if name == "demo-speech":
        from captum_mllm import demo

        return demo.load("cpu")[0]
    return LFM2AudioAdapter(*testing.tiny_lfm2_audio())


def _guess_adapter(name: str) -> str:
    """``lfm2-audio`` for LFM2-Audio checkpoints (by name or config), else ``hf``."""
    config = Path(name) / "config.json"
    text = config.read_text(encoding="utf-8").lower() if config.is_file() else name.lower()
    return "lfm2-audio" if "lfm2" in text and "audio" in text else "hf"
