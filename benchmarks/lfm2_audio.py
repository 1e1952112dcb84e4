"""LFM2-Audio, log-prob target: captum-mllm against a straightforward loop.

Tiny LFM2-Audio, a spoken question (10 audio features of ~0.22 s) and a 6-word
text instruction (6 features), ShapleyValueSampling with n_samples=10. The loop
calls liquid-audio once per coalition, batch size 1, running the conformer each
time (``ChatState`` + ``_prefill`` + one LFM forward); ours batches coalitions,
encodes the clip once and caches coalitions. Same process, and the loop runs
under the heap setting ours does (``retained_heap``); attributions must agree.

Run: ``python benchmarks/lfm2_audio.py [--threads N] [--repeats N]``; with
``CAPTUM_MLLM_RETAIN_HEAP=0`` both sides run without ``retained_heap``.
"""

from __future__ import annotations

import argparse
import resource
import time
from importlib.resources import files

import soundfile as sf
import torch
from captum.attr import ShapleyValueSampling
from host import describe

from captum_mllm import Chat, ChatInput, LFM2AudioAdapter, MultimodalLLMAttribution
from captum_mllm.heap import retained_heap
from captum_mllm.testing import tiny_lfm2_audio

TEXT = "Please answer this question very briefly"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="each side's best of")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    from liquid_audio import ChatState

    model, processor = tiny_lfm2_audio()
    adapter = LFM2AudioAdapter(model, processor)  # counts its conformer calls
    samples, rate = sf.read(str(files("captum_mllm") / "data" / "question.wav"), dtype="float32")
    wave = torch.from_numpy(samples)
    chat = Chat().system("Respond briefly.").user(TEXT, audio=wave, sample_rate=rate)
    inp = ChatInput(chat, adapter, audio_unit=len(wave) / rate / 10)
    n_audio = sum(f.modality == "audio_in" for f in inp.features)
    target = adapter.generate_masked(inp.to_model_input(), max_new_tokens=8)[0].ids[:, 0]
    print(
        f"{n_audio} audio + {inp.n_itp_features - n_audio} text features, "
        f"{len(target)} target tokens, ShapleyValueSampling n_samples=10, {args.threads} threads"
    )

    calls = {"forward": 0, "conformer": 0}

    def naive(coalition: torch.Tensor) -> torch.Tensor:
        """One coalition through liquid-audio, from scratch: (1, n) -> (1, 1 + T)."""
        st = ChatState(processor, dtype=torch.float32)
        st.new_turn("system")
        st.add_text("Respond briefly.")
        st.end_turn()
        st.new_turn("user")
        st.add_audio(wave[None], rate)
        st.add_text(TEXT)
        st.end_turn()
        st.new_turn("assistant")
        with torch.no_grad():
            embeds = model._prefill(**st)[0]  # runs the conformer
            present = inp.to_model_input(coalition).present[0]
            x = torch.cat([embeds[present], model.lfm.embed_tokens(target[:-1])])
            h = model.lfm(inputs_embeds=x[None]).last_hidden_state[0]
            n = int(present.sum())
            logp = (h[n - 1 : n - 1 + len(target)] @ model.lfm.embed_tokens.weight.T).log_softmax(
                -1
            )
            per_token = logp.gather(1, target[:, None])[:, 0]
        calls["forward"] += 1
        calls["conformer"] += 1
        return torch.cat([per_token.sum(0, keepdim=True), per_token])[None]

    t_loop = float("inf")
    for _ in range(args.repeats):  # best of several, as ours (the machine is shared)
        calls.update(forward=0, conformer=0)
        torch.manual_seed(0)
        start = time.perf_counter()
        with retained_heap():  # the allocator setting ours runs under, for a fair loop
            loop = ShapleyValueSampling(naive).attribute(inp.to_tensor(), n_samples=10)
        t_loop = min(t_loop, time.perf_counter() - start)

    attr = MultimodalLLMAttribution(ShapleyValueSampling(adapter), adapter)
    best = float("inf")
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.repeats):
        torch.manual_seed(0)
        start = time.perf_counter()
        res = attr.attribute(inp, target=target, n_samples=10, perturbations_per_eval=32)
        best = min(best, time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    diff = (res.token_attr - loop[0, 1:]).abs().max().item()
    print(f"{'run':34s} {'seconds':>8s} {'LFM forwards':>13s} {'conformer calls':>16s}")
    name = f"liquid-audio loop (best of {args.repeats})"
    print(f"{name:34s} {t_loop:8.3f} {calls['forward']:13d} {calls['conformer']:16d}")
    conformer = adapter.n_encoder_calls  # all of them, building the input included
    name = f"captum-mllm ppe=32 (best of {args.repeats})"
    print(f"{name:34s} {best:8.3f} {res.n_model_calls:13d} {conformer:16d}")
    print(
        f"speed-up {t_loop / best:.1f}x; max |token_attr difference| {diff:.2e}; "
        f"{res.n_unique_coalitions} unique of {res.n_coalitions} coalitions"
    )
    # What captum_mllm.heap saves (compare with CAPTUM_MLLM_RETAIN_HEAP=0).
    print(
        f"captum-mllm, a run on average: {(after.ru_minflt - before.ru_minflt) / args.repeats:.0f} "
        f"page faults, {(after.ru_stime - before.ru_stime) / args.repeats * 1e3:.1f} ms kernel time"
    )


if __name__ == "__main__":
    main()
