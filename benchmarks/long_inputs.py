"""Long inputs on the CPU: peak memory and time, and the cost per added feature.

Two inputs with the tiny models, each explained by leave-one-out
(``FeatureAblation``: one coalition per feature, so time per feature is time
per coalition) with ``perturbations_per_eval=64``:

1. a ~2,000-word user turn at ``text_unit="token"`` (the input that grew past
   10 GB of memory before batches were cut by a token budget), tiny Llama;
2. a 10-minute clip cut in 1-second features (600 features, 7,500 positions),
   tiny LFM2-Audio.

Then the labels of a long run of characters spelt in byte tokens (emoji and
Chinese, each decoding alone to "�"), against Captum's own pretty tokens in
the same process, at two lengths (ours was quadratic in the run).

Each explanation runs at half and at full length in a fresh process, so that the peak
resident memory (``ru_maxrss``) is that run's own. The cost per added feature
is the slope between the two lengths.

Run: ``make bench`` or ``python benchmarks/long_inputs.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from captum.attr import FeatureAblation

from captum_mllm import Chat, ChatInput, LFM2AudioAdapter, MultimodalLLMAttribution
from captum_mllm.testing import speech_like, tiny_hf_adapter, tiny_lfm2_audio

WORDS = (
    "the quick brown fox jumps over the lazy dog near the river bank while music art and "
    "science help people understand the world around them"
).split()


def text_case(scale: float) -> tuple[ChatInput, MultimodalLLMAttribution, str]:
    model = tiny_hf_adapter()
    n_words = int(2000 * scale)
    user = " ".join(WORDS[i % len(WORDS)] for i in range(n_words))
    inp = ChatInput(Chat().system("Summarise.").user(user), model, text_unit="token")
    return inp, MultimodalLLMAttribution(FeatureAblation(model), model), "A short summary"


def audio_case(scale: float) -> tuple[ChatInput, MultimodalLLMAttribution, torch.Tensor]:
    model = LFM2AudioAdapter(*tiny_lfm2_audio())
    wave = speech_like(600 * scale)
    chat = Chat().system("Respond briefly.").user("What is said?", audio=wave, sample_rate=16000)
    inp = ChatInput(chat, model, audio_unit=1.0)
    return inp, MultimodalLLMAttribution(FeatureAblation(model), model), torch.arange(300, 308)


def run_case(name: str, scale: float, threads: int) -> dict[str, float]:
    """One explanation in this process; its figures as a dict."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    inp, attr, target = (text_case if name == "text" else audio_case)(scale)
    built = time.perf_counter() - start
    start = time.perf_counter()
    res = attr.attribute(inp, target=target, perturbations_per_eval=64)
    secs = time.perf_counter() - start
    assert bool(torch.isfinite(res.seq_attr).all())
    return {
        "features": inp.n_itp_features,
        "positions": len(inp.encoded),
        "build_s": built,
        "explain_s": secs,
        "forwards": res.n_model_calls,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", choices=["text", "audio"], help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child process: one run, figures as JSON
        print(json.dumps(run_case(args.case, args.scale, args.threads)))
        return
    print(f"leave-one-out, perturbations_per_eval=64, {args.threads} threads, fresh process each")
    print(
        f"{'input':44s} {'features':>8s} {'positions':>9s} {'seconds':>8s} {'forwards':>8s} "
        f"{'peak RSS MB':>11s}"
    )
    labels = {"text": "~{} words at text_unit='token'", "audio": "{:.0f} s clip, 1 s features"}
    for name in ("text", "audio"):
        runs = []
        for scale in (0.5, 1.0):
            out = subprocess.run(
                [sys.executable, __file__, "--case", name, "--scale", str(scale),
                 "--threads", str(args.threads)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            fig = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(fig)
            size = int(2000 * scale) if name == "text" else 600 * scale
            print(
                f"{labels[name].format(size):44s} {fig['features']:8d} {fig['positions']:9d} "
                f"{fig['explain_s']:8.1f} {fig['forwards']:8d} {fig['peak_rss_mb']:11.0f}"
            )
        half, full = runs
        slope = (full["explain_s"] - half["explain_s"]) / (full["features"] - half["features"])
        print(f"  cost per added feature: {1e3 * slope:.1f} ms")
    label_runs()


def label_runs() -> None:
    """Labelling a long run of split characters: ours against Captum's."""
    from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens

    from captum_mllm.models.base import token_labels

    tokenizer = tiny_hf_adapter().tokenizer
    print("labels of a run of characters spelt in byte tokens (tiny Llama's tokenizer)")
    for repeats in (1000, 4000):
        ids = tokenizer("🗼東😀" * repeats, add_special_tokens=False, return_tensors="pt")
        ids = ids.input_ids[0]
        start = time.perf_counter()
        ours = token_labels(tokenizer.decode, ids, lambda text: text)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        captums = _convert_ids_to_pretty_tokens(ids, tokenizer)
        t_captum = time.perf_counter() - start
        assert ours == captums
        print(
            f"  {len(ids):6d} tokens: ours {t_ours:.2f} s, Captum's {t_captum:.2f} s (same labels)"
        )


if __name__ == "__main__":
    main()
