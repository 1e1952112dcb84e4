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

A random order is the floor. Run: ``python benchmarks/faithfulness.py``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from captum.attr import FeatureAblation, KernelShap, Lime, ShapleyValueSampling
from scipy.stats import spearmanr

from captum_mllm import (
    Chat,
    ChatInput,
    EmbeddingSimilarity,
    LogProbTarget,
    MultimodalLLMAttribution,
    load_default_model,
)
from captum_mllm.methods import (
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
        "ours PairedPermutation 10n": (PairedPermutationSampling, {"budget": budget, "seed": 0}),
        "ours RegressionAdjusted 10n": (RegressionAdjustedShapley, {"budget": budget, "seed": 0}),
        "captum ShapleyValueSampling 10n": (ShapleyValueSampling, {"n_samples": budget // n}),
        "captum KernelShap 10n": (KernelShap, {"n_samples": budget}),
        "captum Lime 10n": (Lime, {"n_samples": budget}),
        "leave-one-out (FeatureAblation)": (FeatureAblation, {}),
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
                methods(n)
                if target_name == "log-prob"
                else {"similarity target, exact Shapley": (ExactShapleyValues, {})}
            )
            for name, (cls, kwargs) in candidates.items():
                torch.manual_seed(0)
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
