"""GPU parity: the library's paths on an accelerator against the CPU.

CI has no GPU, so this script is how a lent GPU checks what the tests check
on the CPU: the same attributions computed on the CPU (float32, deterministic
kernels) and on ``--device`` in float32 (the fused attention kernels, padded
and left-padded batches) and in bfloat16 (no NaN; agreement to bf16's
precision). Paths: exact Shapley of a log-prob target (right-padded scoring
with the prefix cache), paired permutations of a similarity target
(left-padded regeneration, then hidden states), integrated gradients; on the
tiny Llama and the tiny LFM2-Audio (text + audio features).

Run on a GPU: ``python benchmarks/gpu_parity.py``; anywhere: ``--device cpu``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch
from captum.attr import IntegratedGradients

from captum_mllm import (
    Chat,
    ChatInput,
    EmbeddingSimilarity,
    LFM2AudioAdapter,
    MultimodalLLMAttribution,
)
from captum_mllm.gradient import MultimodalLLMGradientAttribution
from captum_mllm.methods import ExactShapleyValues, PairedPermutationSampling
from captum_mllm.testing import speech_like, tiny_hf_adapter, tiny_lfm2_audio

TEXT = (
    "Tell me a story about a cat who lived by the sea in a lighthouse, and about the "
    "quick brown fox who jumps over the lazy dog near the river bank today"
)


def build(kind: str, device: str, dtype: torch.dtype) -> tuple[Any, ChatInput, Any]:
    """Adapter, input (the Llama's 32 words in 5 groups; 1.5 s of audio in 5
    features plus 3 words) and the answer to score."""
    if kind == "llama":
        model = tiny_hf_adapter().to(device)
        model.model.to(dtype)
        inp = ChatInput(
            Chat().system("You are a helpful assistant.").user(TEXT),
            model,
            groups=[i // 7 for i in range(32)],
        )
        return model, inp, "I am a model"
    lfm, processor = tiny_lfm2_audio()
    model = LFM2AudioAdapter(lfm.to(device, dtype), processor.to(device))
    chat = Chat().system("Respond briefly.")
    chat = chat.user("Please answer this", audio=speech_like(1.5), sample_rate=16000)
    return model, ChatInput(chat, model, audio_unit=0.3), torch.arange(300, 306)


def attributions(kind: str, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model, inp, answer = build(kind, device, dtype)
    out = {}
    exact = MultimodalLLMAttribution(ExactShapleyValues(model), model)
    out["exact Shapley, log-prob"] = exact.attribute(
        inp, target=answer, perturbations_per_eval=16
    ).token_attr
    sim = EmbeddingSimilarity(gen_args={"max_new_tokens": 12})
    paired = MultimodalLLMAttribution(PairedPermutationSampling(model), model, target=sim)
    res = paired.attribute(inp, budget=60, seed=1, perturbations_per_eval=16)
    out["paired permutations, similarity"] = res.seq_attr
    ig = MultimodalLLMGradientAttribution(IntegratedGradients(model), model)
    with warnings.catch_warnings():  # 16 steps miss completeness; the devices must agree
        warnings.filterwarnings("ignore", "integrated gradients' attributions")
        out["integrated gradients"] = ig.attribute(inp, target=answer, n_steps=16).token_attr
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(f"{'model':6s} {'dtype':9s} {'path':32s} {'NaN':>5s} {'max |diff|':>11s} {'of':>9s}")
    for kind in ("llama", "lfm2"):
        start = time.perf_counter()
        want = attributions(kind, "cpu", torch.float32)
        for dtype in (torch.float32, torch.bfloat16):
            got = attributions(kind, args.device, dtype)
            for path, ref in want.items():
                value = got[path].float().cpu()
                diff = (value - ref).abs().max().item()
                nan = bool(value.isnan().any())
                name = str(dtype).removeprefix("torch.")
                print(
                    f"{kind:6s} {name:9s} {path:32s} {nan!s:>5s} {diff:11.2e} "
                    f"{ref.abs().max().item():9.2e}"
                )
        print(f"({kind}: {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
