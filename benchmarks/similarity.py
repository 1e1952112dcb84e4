"""Embedding-similarity value function: batched regeneration against one
coalition at a time.

Tiny HF model, 12 word features, 16-token answers, ShapleyValueSampling with
n_samples=10. Ours (perturbations_per_eval=16, coalition cache) against the same
value function evaluated one coalition per generate call without a cache (what
a straightforward loop does: fused attention kernels, no products padded for
determinism), in one process; attributions must agree. Ours once more with
``deterministic=False`` shows what bit-identical regeneration costs.

Run: ``python benchmarks/similarity.py [--threads N]``. (The PyPI package
``mllm-shap`` is not compared here: see the closing notes of Part 3.)
"""

from __future__ import annotations

import argparse
import time

import torch
from captum.attr import ShapleyValueSampling
from host import describe

from captum_mllm import Chat, ChatInput, EmbeddingSimilarity, MultimodalLLMAttribution
from captum_mllm.testing import tiny_hf_adapter

USER = "Tell me a story about a cat who lived by the sea"  # 12 words
GEN = {"max_new_tokens": 16, "min_new_tokens": 16}  # fixed-length answers


def run(attr, inp, ppe: int, cache: bool):
    torch.manual_seed(0)
    start = time.perf_counter()
    res = attr.attribute(inp, n_samples=10, perturbations_per_eval=ppe, cache_coalitions=cache)
    return res, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    model = tiny_hf_adapter(hidden_size=256, num_layers=4).to(args.device)
    inp = ChatInput(Chat().system("You are a helpful assistant.").user(USER), model)
    sim = EmbeddingSimilarity("static", gen_args=GEN)
    attr = MultimodalLLMAttribution(ShapleyValueSampling(model), model, target=sim)
    print(
        f"{inp.n_itp_features} word features, 16-token answers, ShapleyValueSampling n_samples=10"
    )
    model.deterministic = False  # a plain loop: fused kernels, no padded products
    one, t_one = run(attr, inp, ppe=1, cache=False)
    fused, t_fused = run(attr, inp, ppe=16, cache=True)  # what determinism costs, below
    model.deterministic = None  # ours as shipped: bit-identical in any batch on a CPU
    ours, t_ours = run(attr, inp, ppe=16, cache=True)
    diff = (one.seq_attr - ours.seq_attr).abs().max().item()
    print(f"{'run':38s} {'seconds':>8s} {'generate calls':>15s}")
    print(f"{'one coalition at a time, no cache':38s} {t_one:8.2f} {one.n_model_calls:15d}")
    print(f"{'captum-mllm batched + cached (ppe=16)':38s} {t_ours:8.2f} {ours.n_model_calls:15d}")
    name = "  same, deterministic=False"
    print(f"{name:38s} {t_fused:8.2f} {fused.n_model_calls:15d}")
    print(f"speed-up {t_one / t_ours:.1f}x; max |attribution difference| {diff:.2e}")


if __name__ == "__main__":
    main()
