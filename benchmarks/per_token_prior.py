"""Are the answer's per-token values new information for BayesianShapley? (issue 17)

Each coalition's log-probability game comes with one value per answer token
(their sum is the total the benchmark scores), at no extra model call. A
Gaussian-process estimator could give each token's game a prior of its own
(order decay and size term fitted on that token's values) and sum the tokens'
posterior means. On the SmolLM2 game of ``estimators.py`` (the same question
and greedy answer; every coalition's values once), at 10n coalitions over
seeds, it prints the relative error of: ``BayesianShapley`` on the total
alone, on all columns with one prior, on each token with its own prior
(summed), and ``LeverageKernelShap`` on the total and on the tokens summed (a
linear estimator: the same), beside Captum's ``ShapleyValueSampling``.

Run: ``python benchmarks/per_token_prior.py [--seeds 5]`` (about 3 minutes on
2 CPU cores, most of it the 4,096 coalitions' values).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from captum.attr import ShapleyValueSampling
from estimators import QUESTION, error
from host import describe

from captum_mllm import Chat, ChatInput, MemoryStore, MultimodalLLMAttribution, load_default_model
from captum_mllm.encoding import coalition_key
from captum_mllm.methods import BayesianShapley, ExactShapleyValues, LeverageKernelShap, bayes


def token_table() -> np.ndarray:
    """``(2^n, 1 + T)``: every coalition's total, then each answer token's log-probability."""
    model = load_default_model()
    inp = ChatInput(Chat().user(QUESTION), model)
    attr = MultimodalLLMAttribution(ExactShapleyValues(model), model)
    answer = attr.attribute(  # the greedy answer (one feature: two coalitions)
        ChatInput(Chat().user(QUESTION), model, groups=[0] * inp.n_itp_features),
        gen_args={"max_new_tokens": 12},
    )
    store = MemoryStore()
    start = time.perf_counter()
    attr.attribute(inp, store=store, perturbations_per_eval=64, target=answer.target_ids)
    n = inp.n_itp_features
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    rows = [store.entries[coalition_key(torch.from_numpy(m))][0] for m in masks]
    print(
        f"answer {answer.response_text!r}: {2**n} coalitions in {time.perf_counter() - start:.0f} s"
    )
    return np.asarray(rows, dtype=np.float64)


def per_column_posterior(masks: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``bayes._posterior`` with each column's own hyperparameters."""
    fits = [SHARED_POSTERIOR(masks, half[:, [k]]) for k in range(half.shape[1])]
    return np.concatenate([f[0] for f in fits]), np.concatenate([f[1] for f in fits])


SHARED_POSTERIOR = bayes._posterior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    values = token_table()
    n = int(np.log2(len(values)))
    bits = 1 << np.arange(n)
    ones = torch.ones(1, n, dtype=torch.float64)

    def game(columns: list[int]):
        def f(x: torch.Tensor) -> torch.Tensor:
            index = (x.detach().cpu().numpy() != 0).astype(np.int64) @ bits
            return torch.from_numpy(values[index][:, columns])

        return f

    def run(method, columns: list[int], budget: int, seed: int) -> np.ndarray:
        out = method(game(columns)).attribute(ones, budget=budget, seed=seed)
        return np.asarray(out).reshape(len(columns), n)

    total, tokens = [0], list(range(1, values.shape[1]))
    exact = ExactShapleyValues(game(total)).attribute(ones).numpy().reshape(-1)
    budget = 10 * n
    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        svs = ShapleyValueSampling(game(total)).attribute(ones, n_samples=budget // n)
        estimates = {
            "captum ShapleyValueSampling": svs.numpy().reshape(-1),
            "BayesianShapley, total": run(BayesianShapley, total, budget, seed)[0],
            "BayesianShapley, all columns, one prior": run(
                BayesianShapley, total + tokens, budget, seed
            )[0],
            "LeverageKernelShap, total": run(LeverageKernelShap, total, budget, seed)[0],
            "LeverageKernelShap, tokens summed": run(LeverageKernelShap, tokens, budget, seed).sum(
                0
            ),
        }
        bayes._posterior = per_column_posterior
        try:
            own = run(BayesianShapley, tokens, budget, seed).sum(0)
        finally:
            bayes._posterior = SHARED_POSTERIOR
        estimates["BayesianShapley, each token its own prior"] = own
        for name, estimate in estimates.items():
            rows.setdefault(name, []).append(error(estimate, exact))
    print(f"\nSmolLM2, {n} words, {values.shape[1] - 1} answer tokens, {budget} coalitions (10n)")
    print(f"{'estimator':44s} {'rel. error (mean)':>18s}  per seed")
    for name, errors in rows.items():
        print(f"{name:44s} {np.mean(errors):18.4f}  {', '.join(f'{e:.3f}' for e in errors)}")
    goal = np.mean(rows["captum ShapleyValueSampling"]) / 5
    print(f"issue 17's goal (Captum's error / 5): {goal:.4f}")


if __name__ == "__main__":
    main()
