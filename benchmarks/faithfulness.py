"""Do explanations mean something? Deletion and insertion on the real SmolLM2.

For each prompt (a factual question; the model's own greedy answer is the
target) and each method, features are removed (deletion) or added to the
empty prompt (insertion) in the order of their attributions, and the answer is
re-scored after each step with the method's own value function. Reported, as
means over prompts:

- deletion: mean over k of (v(all) - v(all but the top k)) / (v(all) - v(none));
  higher is better (the top features matter most);
- insertion: mean over k of (v(top k) - v(none)) / (v(all) - v(none)); higher is better;
- rank correlation (Spearman) between each feature's attribution and the drop
  its removal alone causes (MLLM-SHAP's faithfulness study found this near
  zero for its similarity target).

A random order is the floor.

Speech (``--speech``, or alone with ``--speech-only``): the project's trained
demo speech model (:mod:`captum_mllm.demo`) on spoken requests synthesised
afresh with espeak-ng (new random voices, speeds and noise): the right answer
"kitchen light on" is explained with one feature per spoken word (aligned by
the demo aligner), and we count how often the deciding word ("kitchen",
"light", "on") gets the largest attribution for the answer token it decides,
per method and budget, per audio baseline, with the deletion area.

Retrieved passages: for twelve facts, a prompt of four passages (the one
holding the fact and three others, in a seeded order) and the question, one
feature a passage (``text_unit="paragraph"``) and one the question; the
answer sentence is the target, and we count how often the passage holding
it gets the largest attribution among the passages (chance: 1 in 4).

Why this answer rather than another (``ContrastiveTarget``): twelve prompts
of four sentences "<name> lives in <city>." and a question about one person;
the person's city is the answer, another person's city the foil, one feature
a sentence. We count how often the answer's sentence gets the largest
attribution and the foil's sentence the smallest, for the answer's
log-probability alone and for the contrast (chance: 1 in 4 each).

Run: ``python benchmarks/faithfulness.py [--speech | --speech-only | --passages-only |
--contrast-only] [--speech-seed 2026]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from captum.attr import (
    FeatureAblation,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    Lime,
    Saliency,
    ShapleyValueSampling,
)
from scipy.stats import spearmanr

from captum_mllm import (
    Chat,
    ChatInput,
    ContrastiveTarget,
    EmbeddingSimilarity,
    LogProbTarget,
    MultimodalLLMAttribution,
    load_default_model,
)
from captum_mllm.attention import AttentionAttribution
from captum_mllm.gradient import MultimodalLLMGradientAttribution
from captum_mllm.methods import (
    BayesianShapley,
    ExactShapleyValues,
    LeverageKernelShap,
    PairedPermutationSampling,
    RegressionAdjustedShapley,
)

PROMPTS = [
    "What is the capital of France?",
    "What is the capital city of Japan?",
    "Which planet is known as the red planet?",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
]
GEN = {"max_new_tokens": 12}


def methods(n: int) -> dict[str, tuple[object, dict]]:
    budget = 10 * n
    return {
        "exact Shapley": (ExactShapleyValues, {}),
        "ours LeverageKernelShap 10n": (LeverageKernelShap, {"budget": budget, "seed": 0}),
        "ours BayesianShapley 10n": (BayesianShapley, {"budget": budget, "seed": 0}),
        "ours PairedPermutation 10n": (PairedPermutationSampling, {"budget": budget, "seed": 0}),
        "ours RegressionAdjusted 10n": (RegressionAdjustedShapley, {"budget": budget, "seed": 0}),
        "captum ShapleyValueSampling 10n": (ShapleyValueSampling, {"n_samples": budget // n}),
        "captum KernelShap 10n": (KernelShap, {"n_samples": budget}),
        "captum Lime 10n": (Lime, {"n_samples": budget}),
        "leave-one-out (FeatureAblation)": (FeatureAblation, {}),
    }


def gradient_methods(attention: bool) -> dict[str, tuple[object, dict]]:
    """One or two passes per answer token instead of many coalitions."""
    out: dict[str, tuple[object, dict]] = {
        "integrated gradients (64 steps)": (
            lambda m: MultimodalLLMGradientAttribution(IntegratedGradients(m), m),
            {"n_steps": 64, "internal_batch_size": 64},
        ),
        "input x gradient": (lambda m: MultimodalLLMGradientAttribution(InputXGradient(m), m), {}),
        "saliency (L2 norm)": (
            lambda m: MultimodalLLMGradientAttribution(Saliency(m), m, reduce="norm"),
            {},
        ),
    }
    if attention:
        for how in ("mean", "rollout"):
            out[f"attention {how}"] = (lambda m, how=how: AttentionAttribution(m, how), {})
    return out


GRADIENT_NAMES = set(gradient_methods(attention=True))


def explain_with(build, kwargs: dict, model, inp, target: str | torch.Tensor):
    """Run a gradient / attention method: ``build(model).attribute(...)``."""
    return build(model).attribute(inp, target=target, **kwargs)


def curves(value, order: np.ndarray, n: int) -> tuple[float, float]:
    """Normalised deletion and insertion areas for one order of features."""
    deletion = np.ones((n + 1, n))
    insertion = np.zeros((n + 1, n))
    for k in range(1, n + 1):
        deletion[k, order[:k]] = 0
        insertion[k, order[:k]] = 1
    v_del = value(torch.from_numpy(deletion).float())
    v_ins = value(torch.from_numpy(insertion).float())
    full, empty = v_del[0], v_ins[0]
    span = full - empty if abs(full - empty) > 1e-9 else 1e-9
    return float(np.mean((full - v_del[1:]) / span)), float(np.mean((v_ins[1:] - empty) / span))


def speech(n_requests: int, seed: int = 2026) -> None:
    """Ground truth on the demo speech model: does the deciding word rank first?"""
    from captum_mllm import demo
    from captum_mllm.demo.task import all_requests, synthesise

    model, aligner = demo.load()
    rng = np.random.default_rng(seed)  # voices and noise the training never drew
    pool = all_requests()
    requests = [pool[i] for i in rng.choice(len(pool), n_requests, replace=False)]
    rows: dict[str, list[tuple[float, float]]] = {}
    start = time.perf_counter()
    for request in requests:
        said = synthesise(request, rng, joined=False)
        for audio_baseline in ("drop", "embedding", "silence"):
            inp = demo.request_input(
                model, aligner, said.waveform, request.transcript, audio_baseline=audio_baseline
            )
            n = inp.n_itp_features
            target = LogProbTarget()
            response = model.text_response(request.answer)
            state = target.prepare(model, inp.to_model_input(), response, reuse_prefix=False)

            def value(masks, target=target, state=state, response=response, inp=inp):
                out = target.evaluate(model, inp.to_model_input(masks), response, state)
                return out.values[:, 0].double().numpy()

            chosen = (
                methods(n)
                if audio_baseline == "silence"
                else {"exact Shapley": methods(n)["exact Shapley"]}
            )
            if audio_baseline == "silence":
                for k in (2, 5):
                    for name, cls in (
                        ("ours LeverageKernelShap", LeverageKernelShap),
                        ("ours BayesianShapley", BayesianShapley),
                        ("ours PairedPermutation", PairedPermutationSampling),
                    ):
                        chosen[f"{name} {k}n"] = (cls, {"budget": k * n, "seed": 0})
                    chosen[f"captum ShapleyValueSampling {k}n"] = (
                        ShapleyValueSampling,
                        {"n_samples": k},
                    )
                chosen.update(gradient_methods(attention=True))  # no silencing: embeddings
            for name, (cls, kwargs) in chosen.items():
                torch.manual_seed(0)
                if name in GRADIENT_NAMES:
                    res = explain_with(cls, kwargs, model, inp, request.answer)
                else:
                    attr = MultimodalLLMAttribution(cls(model), model, target=target)
                    res = attr.attribute(
                        inp, target=request.answer, perturbations_per_eval=64, **kwargs
                    )
                if res.token_attr is None:  # Lime and KernelShap: the total only
                    hits = [np.nan]
                else:
                    top = demo.top_words(res)
                    hits = [word in top[k] for k, word in enumerate(request.deciding)]
                deletion, _ = curves(value, np.argsort(-res.seq_attr.double().numpy()), n)
                rows.setdefault(f"{name} [{audio_baseline}]", []).append((np.mean(hits), deletion))
    print(
        f"\nspeech: {len(requests)} spoken requests on the demo model, "
        f"{time.perf_counter() - start:.0f} s"
    )
    print(f"{'method [audio baseline]':44s} {'deciding word first':>20s} {'deletion':>9s}")
    for name, values in rows.items():
        table = np.array(values, dtype=float)
        first = np.nan if np.isnan(table[:, 0]).all() else np.nanmean(table[:, 0])
        deletion = table[:, 1].mean()
        first_text = "n/a (no token_attr)" if np.isnan(first) else f"{first:.2f}"
        print(f"{name:44s} {first_text:>20s} {deletion:9.3f}")


#: Facts for the retrieved-passages section: (passage, question, answer).
FACTS = [
    ("The capital city of France is Paris.", "What is the capital city of France?",
     "The capital city of France is Paris."),
    ("Mount Fuji is the highest mountain in Japan.", "What is the highest mountain in Japan?",
     "The highest mountain in Japan is Mount Fuji."),
    ("A spider has eight legs.", "How many legs does a spider have?",
     "A spider has eight legs."),
    ("The Pacific is the largest ocean on Earth.", "What is the largest ocean on Earth?",
     "The largest ocean on Earth is the Pacific."),
    ("Mars is known as the red planet.", "Which planet is known as the red planet?",
     "Mars is known as the red planet."),
    ("Water boils at one hundred degrees Celsius.", "At what temperature does water boil?",
     "Water boils at one hundred degrees Celsius."),
    ("The Nile is the longest river in Africa.", "What is the longest river in Africa?",
     "The longest river in Africa is the Nile."),
    ("Honey is made by bees.", "Which insects make honey?", "Honey is made by bees."),
    ("The Eiffel Tower stands in Paris.", "In which city is the Eiffel Tower?",
     "The Eiffel Tower is in Paris."),
    ("Penguins live in Antarctica.", "Where do penguins live?", "Penguins live in Antarctica."),
    ("The violin has four strings.", "How many strings does a violin have?",
     "A violin has four strings."),
    ("Tokyo is the capital city of Japan.", "What is the capital city of Japan?",
     "The capital city of Japan is Tokyo."),
]  # fmt: skip


def passages(seed: int = 0, distractors: int = 3) -> None:
    """Retrieval-augmented prompts, one feature a passage (``text_unit="paragraph"``):
    does the passage holding the answer get the largest attribution among them?"""
    model = load_default_model()
    rng = np.random.default_rng(seed)
    n = distractors + 2  # the passages and the question
    chosen = {
        "exact Shapley": (ExactShapleyValues, {}),
        "ours LeverageKernelShap 2n": (LeverageKernelShap, {"budget": 2 * n, "seed": 0}),
        "ours BayesianShapley 2n": (BayesianShapley, {"budget": 2 * n, "seed": 0}),
        "captum ShapleyValueSampling 2n": (ShapleyValueSampling, {"n_samples": 2}),
        "leave-one-out (FeatureAblation)": (FeatureAblation, {}),
        **{  # integrated gradients: 64 passes an answer token, minutes a long prompt here
            k: v for k, v in gradient_methods(attention=True).items() if "integrated" not in k
        },
    }
    firsts: dict[str, list[bool]] = {}
    start = time.perf_counter()
    for i, (passage, question, answer) in enumerate(FACTS):
        others = rng.choice([f[0] for j, f in enumerate(FACTS) if j != i], distractors, False)
        texts = [passage, *others]
        order = rng.permutation(len(texts))
        texts = [texts[k] for k in order]
        holding = int(np.flatnonzero(order == 0)[0])
        inp = ChatInput(Chat().user("\n\n".join([*texts, question])), model, text_unit="paragraph")
        for name, (cls, kwargs) in chosen.items():
            torch.manual_seed(0)
            if name in GRADIENT_NAMES:
                res = explain_with(cls, kwargs, model, inp, answer)
            else:
                attr = MultimodalLLMAttribution(cls(model), model)
                res = attr.attribute(inp, target=answer, perturbations_per_eval=64, **kwargs)
            among = res.seq_attr[: len(texts)].double().numpy()
            firsts.setdefault(name, []).append(int(np.argmax(among)) == holding)
    print(
        f"\n{len(FACTS)} retrieval prompts on SmolLM2-135M-Instruct ({distractors} distractor "
        f"passages each, seed {seed}), {time.perf_counter() - start:.0f} s; chance "
        f"{1 / (distractors + 1):.2f}"
    )
    print(f"{'method':36s} {'passage holding the answer first':>33s}")
    for name, hits in firsts.items():
        print(f"{name:36s} {np.mean(hits):33.2f}")


NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry"]
CITIES = ["Paris", "Rome", "Oslo", "Madrid", "Berlin", "Vienna", "Dublin", "Lisbon"]


def contrast(seed: int = 0, prompts: int = 12) -> None:
    """Why the asked person's city rather than another person's: does the
    answer's sentence come first and the foil's last, without and with the foil?"""
    model = load_default_model()
    rng = np.random.default_rng(seed)
    chosen = {
        "exact Shapley": (ExactShapleyValues, {}),
        "ours BayesianShapley 2n": (BayesianShapley, {"seed": 0}),
        "ours LeverageKernelShap 2n": (LeverageKernelShap, {"seed": 0}),
        "leave-one-out (FeatureAblation)": (FeatureAblation, {}),
        "input x gradient": (InputXGradient, {}),
        "integrated gradients (32 steps)": (IntegratedGradients, {"n_steps": 32}),
    }
    hits: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    start = time.perf_counter()
    for _ in range(prompts):
        names = rng.choice(NAMES, 4, replace=False)
        cities = rng.choice(CITIES, 4, replace=False)
        asked, other = rng.choice(4, 2, replace=False)
        said = " ".join(f"{who} lives in {city}." for who, city in zip(names, cities, strict=True))
        text = f"{said} Where does {names[asked]} live? Answer with the city only."
        inp = ChatInput(Chat().user(text), model, text_unit="sentence")
        for name, (cls, kwargs) in chosen.items():
            for target_name, target in (
                ("answer alone", None),
                ("answer less foil", ContrastiveTarget(str(cities[other]))),
            ):
                if cls in (InputXGradient, IntegratedGradients):
                    attr = MultimodalLLMGradientAttribution(cls(model), model, target=target)
                else:
                    attr = MultimodalLLMAttribution(cls(model), model, target=target)
                if "seed" in kwargs:  # the samplers, at 2 coalitions a feature
                    kwargs = {**kwargs, "budget": 2 * inp.n_itp_features}
                res = attr.attribute(inp, target=str(cities[asked]), **kwargs)
                among = res.seq_attr[:4].double().numpy()
                row = (int(np.argmax(among)) == asked, int(np.argmin(among)) == other)
                hits.setdefault((name, target_name), []).append(row)
    print(
        f"\n{prompts} 'who lives where' prompts on SmolLM2-135M-Instruct (4 people, seed "
        f"{seed}), {time.perf_counter() - start:.0f} s; chance 0.25"
    )
    print(
        f"{'method':34s} {'target':18s} {'answer sentence first':>22s} {'foil sentence last':>19s}"
    )
    for (name, target_name), rows in hits.items():
        first, last = np.mean(rows, axis=0)
        print(f"{name:34s} {target_name:18s} {first:22.2f} {last:19.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speech", action="store_true", help="add the speech section")
    parser.add_argument("--speech-only", action="store_true")
    parser.add_argument("--speech-requests", type=int, default=20)
    parser.add_argument("--speech-seed", type=int, default=2026, help="draws requests and voices")
    parser.add_argument("--passages-only", action="store_true", help="the retrieval section alone")
    parser.add_argument(
        "--contrast-only", action="store_true", help="the contrastive section alone"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.speech or args.speech_only:
        speech(args.speech_requests, args.speech_seed)
    if args.speech_only:
        return
    if not args.contrast_only:
        passages()
    if args.passages_only:
        return
    contrast()
    if args.contrast_only:
        return
    model = load_default_model()
    rows: dict[str, list[tuple[float, float, float]]] = {}
    start = time.perf_counter()
    for prompt in PROMPTS:
        inp = ChatInput(Chat().user(prompt), model)
        n = inp.n_itp_features
        first = MultimodalLLMAttribution(FeatureAblation(model), model)
        answer = first.attribute(inp, gen_args=GEN).target_ids
        print(f"{prompt!r} -> {model.response(answer).text!r} ({n} words)")
        for target_name, target in (("log-prob", LogProbTarget()), ("similarity", None)):
            if target is None:
                target = EmbeddingSimilarity(gen_args=GEN)
            response = model.check_target(answer)
            state = target.prepare(model, inp.to_model_input(), response, reuse_prefix=False)

            def value(masks, target=target, state=state, response=response, inp=inp):
                out = target.evaluate(model, inp.to_model_input(masks), response, state)
                return out.values[:, 0].double().numpy()

            alone = value(torch.eye(n).logical_not().float())  # each feature removed alone
            drop = value(torch.ones(1, n))[0] - alone
            candidates = (
                {**methods(n), **gradient_methods(attention=True)}
                if target_name == "log-prob"
                else {"similarity target, exact Shapley": (ExactShapleyValues, {})}
            )
            for name, (cls, kwargs) in candidates.items():
                torch.manual_seed(0)
                if name in GRADIENT_NAMES:
                    res = explain_with(cls, kwargs, model, inp, answer)
                else:
                    attr = MultimodalLLMAttribution(cls(model), model, target=target)
                    res = attr.attribute(inp, target=answer, perturbations_per_eval=64, **kwargs)
                phi = res.seq_attr.double().numpy()
                deletion, insertion = curves(value, np.argsort(-phi), n)
                rho = spearmanr(phi, drop).statistic
                rows.setdefault(name, []).append((deletion, insertion, rho))
            rng = np.random.default_rng(0)
            name = f"random order ({target_name})"
            scores = [curves(value, rng.permutation(n), n) for _ in range(10)]
            rows.setdefault(name, []).append((*np.mean(scores, axis=0), np.nan))
    print(f"\n{len(PROMPTS)} prompts on SmolLM2-135M-Instruct, {time.perf_counter() - start:.0f} s")
    print(f"{'method':36s} {'deletion':>9s} {'insertion':>10s} {'rank corr. with drop':>21s}")
    for name, values in rows.items():
        table = np.array(values, dtype=float)
        d, i = table[:, :2].mean(axis=0)
        corr = "" if np.isnan(table[:, 2]).all() else f"{np.nanmean(table[:, 2]):.2f}"
        print(f"{name:36s} {d:9.3f} {i:10.3f} {corr:>21s}")


if __name__ == "__main__":
    main()
