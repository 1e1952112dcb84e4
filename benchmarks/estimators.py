"""Shapley estimators against exact values: ours, Captum's and shapiq's.

Each game's value of every one of its 2^n coalitions is computed once
(``ExactShapleyValues`` through ``MultimodalLLMAttribution``); every
estimator then runs on that table, so the comparison is of estimators at equal
budgets (coalition evaluations), on the same games, in one process:

- synthetic: 14 features, interactions of order 2, 3 and 14 (a sine of the size);
- llama: the tiny Llama, a 12-word chat, log-probability of its answer;
- lfm2-audio: the tiny LFM2-Audio, a spoken question plus text, 12 features;
- similarity: the tiny Llama, 12 words, cosine similarity of regenerated answers;
- smollm2: the real SmolLM2-135M-Instruct, a 12-word question (skip: --skip-real).

For budgets 2n, 5n, 10n, 20n: relative L2 error and Spearman rank correlation
against the exact values (mean and spread over seeds) and the estimator's own
time. Baselines: Captum's ShapleyValueSampling, KernelShap and Lime, and
shapiq's PermutationSamplingSV, KernelSHAP, UnbiasedKernelSHAP, SVARM and
RegressionMSR (``pip install shapiq``; benchmark only).

Then, on SmolLM2, time to accuracy: the wall time for our best sampler and for
stock Captum's ShapleyValueSampling (sequence path) to reach a relative error
of 0.1, each run for real at the budget the table says it needs.

Run: ``python benchmarks/estimators.py [--seeds 10] [--skip-real] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from captum.attr import KernelShap, Lime, LLMAttribution, ShapleyValueSampling
from host import describe
from scipy.stats import spearmanr

from captum_mllm import (
    Chat,
    ChatInput,
    EmbeddingSimilarity,
    LFM2AudioAdapter,
    MemoryStore,
    MultimodalLLMAttribution,
)
from captum_mllm.captum_compat import text_template_input
from captum_mllm.encoding import coalition_key
from captum_mllm.methods import (
    BayesianShapley,
    ExactShapleyValues,
    LeverageKernelShap,
    PairedPermutationSampling,
    RegressionAdjustedShapley,
)
from captum_mllm.testing import speech_like, tiny_hf_adapter, tiny_lfm2_audio

OURS = {
    "ours PairedPermutation": PairedPermutationSampling,
    "ours LeverageKernelShap": LeverageKernelShap,
    "ours RegressionAdjusted": RegressionAdjustedShapley,
    "ours BayesianShapley": BayesianShapley,
}
QUESTION = "Tell me in one sentence what the capital city of France is."  # 12 words


class Table:
    """Every coalition's value of one game, indexed by its bit mask."""

    def __init__(self, values: np.ndarray, n: int) -> None:
        self.values, self.n = values, n
        self.exact = _exact_from_table(values, n)
        self.bits = 1 << np.arange(n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        index = (x.detach().cpu().numpy() != 0).astype(np.int64) @ self.bits
        return torch.from_numpy(self.values[index])


def _exact_from_table(values: np.ndarray, n: int) -> np.ndarray:
    est = ExactShapleyValues(lambda x: torch.from_numpy(values[_index(x, n)]))
    return est.attribute(torch.ones(1, n, dtype=torch.float64))[0].numpy()


def _index(x: torch.Tensor, n: int) -> np.ndarray:
    return (x.detach().cpu().numpy() != 0).astype(np.int64) @ (1 << np.arange(n))


def table_of_chat(attr: MultimodalLLMAttribution, inp: ChatInput, **kwargs) -> Table:
    """Exact values of a chat game (column 0: the whole answer), all 2^n coalitions."""
    store = MemoryStore()
    start = time.perf_counter()
    res = attr.attribute(inp, store=store, perturbations_per_eval=64, **kwargs)
    seconds = time.perf_counter() - start
    n = inp.n_itp_features
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    values = np.array([store.entries[coalition_key(torch.from_numpy(m))][0][0] for m in masks])
    print(f"  exact values: {2**n} coalitions in {seconds:.1f} s ({res.n_model_calls} calls)")
    return Table(values.astype(np.float64), n)


def games(skip_real: bool) -> dict[str, tuple[Table, object]]:
    out: dict[str, tuple[Table, object]] = {}
    n = 14
    g = np.random.default_rng(0)
    a, b = g.normal(size=n), np.triu(g.normal(size=(n, n)), 1) * 0.8
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    values = masks @ a + ((masks @ b) * masks).sum(1) + 2.0 * masks[:, :3].prod(1)
    values = values + 0.5 * np.sin(3 * masks.sum(1))
    out["synthetic"] = (Table(values.astype(np.float64), n), None)

    print("game llama")
    llama = tiny_hf_adapter()
    chat = (
        Chat()
        .system("You are a helpful assistant.")
        .user("Please explain why the sky is blue in one short sentence today")
    )
    inp = ChatInput(chat, llama)
    attr = MultimodalLLMAttribution(ExactShapleyValues(llama), llama)
    out["llama"] = (table_of_chat(attr, inp, gen_args={"max_new_tokens": 8}), None)

    print("game lfm2-audio")
    lfm = LFM2AudioAdapter(*tiny_lfm2_audio())
    chat = (
        Chat()
        .system("Be brief.")
        .user("What is it about?", audio=speech_like(2.0), sample_rate=16000)
    )
    inp = ChatInput(chat, lfm, audio_unit=0.25)
    attr = MultimodalLLMAttribution(ExactShapleyValues(lfm), lfm)
    gen = {"max_new_tokens": 8, "output_modality": "text+audio"}
    out["lfm2-audio"] = (table_of_chat(attr, inp, gen_args=gen), None)

    print("game similarity")
    chat = Chat().user("Tell me a story about a cat who lived by the sea")
    sim = EmbeddingSimilarity(gen_args={"max_new_tokens": 8})
    inp = ChatInput(chat, llama)
    attr = MultimodalLLMAttribution(ExactShapleyValues(llama), llama, target=sim)
    out["similarity"] = (table_of_chat(attr, inp), None)

    if not skip_real:
        from captum_mllm import load_default_model

        print("game smollm2")
        smol = load_default_model()
        inp = ChatInput(Chat().user(QUESTION), smol)
        attr = MultimodalLLMAttribution(ExactShapleyValues(smol), smol)
        answer = attr.attribute(  # the greedy answer (one feature: two coalitions)
            ChatInput(Chat().user(QUESTION), smol, groups=[0] * 12),
            gen_args={"max_new_tokens": 12},
        )
        print(f"  answer: {answer.response_text!r}")
        table = table_of_chat(attr, inp, target=answer.target_ids)
        out["smollm2"] = (table, (smol, inp, answer.target_ids))
    return out


Estimator = Callable[[Table, int, int], np.ndarray]


def ours(cls) -> Estimator:
    def run(table: Table, budget: int, seed: int) -> np.ndarray:
        ones = torch.ones(1, table.n, dtype=torch.float64)
        return cls(table).attribute(ones, budget=budget, seed=seed)[0].numpy()

    return run


def captum(name: str) -> Estimator:
    def run(table: Table, budget: int, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        ones = torch.ones(1, table.n, dtype=torch.float64)
        n = table.n
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "ShapleyValueSampling":  # 1 + n evaluations a permutation
                out = ShapleyValueSampling(table).attribute(ones, n_samples=max(1, budget // n))
            elif name == "KernelShap":
                out = KernelShap(table).attribute(ones, n_samples=budget)
            else:
                out = Lime(table).attribute(ones, n_samples=budget)
        return out[0].double().numpy()

    return run


def shapiq_method(name: str) -> Estimator | None:
    try:
        import shapiq
    except ImportError:
        return None

    def run(table: Table, budget: int, seed: int) -> np.ndarray:
        n = table.n

        def game(coalitions: np.ndarray) -> np.ndarray:
            return table.values[np.atleast_2d(coalitions).astype(np.int64) @ table.bits]

        kwargs: dict[str, object] = {"random_state": seed}
        if name == "SVARM":
            kwargs["index"] = "SV"
        if name == "RegressionMSR":
            kwargs.update(index="SV", proxy_model="linear")
        approx = getattr(shapiq, name)(n, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = approx.approximate(budget, game)
        return np.array([values[(i,)] for i in range(n)])

    return run


def methods() -> dict[str, Estimator]:
    out: dict[str, Estimator] = {name: ours(cls) for name, cls in OURS.items()}
    for name in ("ShapleyValueSampling", "KernelShap", "Lime"):
        out[f"captum {name}"] = captum(name)
    for name in (
        "PermutationSamplingSV",
        "KernelSHAP",
        "UnbiasedKernelSHAP",
        "SVARM",
        "RegressionMSR",
    ):
        run = shapiq_method(name)
        if run is not None:
            out[f"shapiq {name}"] = run
    return out


def error(estimate: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))


def evaluate(run: Estimator, table: Table, budget: int, seeds: int) -> tuple[float, ...]:
    errors, ranks, seconds = [], [], []
    for seed in range(seeds):
        start = time.perf_counter()
        est = run(table, budget, seed)
        seconds.append(time.perf_counter() - start)
        errors.append(error(est, table.exact))
        ranks.append(spearmanr(est, table.exact).statistic)
    return (
        float(np.mean(errors)),
        float(np.std(errors)),
        float(np.mean(ranks)),
        float(np.mean(seconds)),
    )


def budget_for(run: Estimator, table: Table, goal: float, seeds: int, step: int) -> int | None:
    """The smallest budget (in steps) whose mean error over seeds is below ``goal``."""
    for budget in range(step, 200 * table.n, step):
        if np.mean([error(run(table, budget, s), table.exact) for s in range(seeds)]) <= goal:
            return budget
    return None


def time_to_accuracy(table: Table, real: tuple, best: str, seeds: int) -> None:
    model, inp, target = real
    n = table.n
    print(f"\ntime to a relative error of 0.1 on smollm2 ({n} words), mean over {seeds} seeds:")
    # each in its own unit: a pair of coalitions for ours, a permutation (n + 1) for Captum's
    ours_budget = budget_for(ours(OURS[best]), table, 0.1, seeds, 2)
    captum_budget = budget_for(captum("ShapleyValueSampling"), table, 0.1, seeds, n)
    if ours_budget is None or captum_budget is None:
        print("  a method never reached 0.1 within 200n coalitions")
        return
    attr = MultimodalLLMAttribution(OURS[best](model), model)
    start = time.perf_counter()
    res = attr.attribute(inp, target=target, budget=ours_budget, perturbations_per_eval=64, seed=0)
    t_ours = time.perf_counter() - start
    stock = LLMAttribution(ShapleyValueSampling(model.model), model.tokenizer)
    n_samples = max(1, captum_budget // n)
    torch.manual_seed(0)
    start = time.perf_counter()
    stock_res = stock.attribute(
        text_template_input(inp), target=target, n_samples=n_samples, forward_in_tokens=False
    )
    t_stock = time.perf_counter() - start
    ours_error = error(res.seq_attr.double().numpy(), table.exact)
    print(f"  {best}: budget {ours_budget}, {t_ours:.1f} s, error {ours_error:.3f}")
    print(
        f"  stock Captum ShapleyValueSampling (forward_in_tokens=False): n_samples {n_samples}, "
        f"{t_stock:.1f} s, error {error(stock_res.seq_attr.double().numpy(), table.exact):.3f}"
    )
    print(f"  time to accuracy: {t_stock / t_ours:.1f}x shorter")


def exact_cost() -> None:
    """Exact Shapley values of 16 words on the tiny Llama, against one forward's time."""
    llama = tiny_hf_adapter()
    words = "tell me a story about a cat who lived by the sea near a big town"
    inp = ChatInput(Chat().system("You are a helpful assistant.").user(words), llama)
    attr = MultimodalLLMAttribution(ExactShapleyValues(llama), llama)
    target = "A cat lived by the sea."
    attr.attribute(ChatInput(Chat().user("Hi"), llama), target=target)  # warm up
    start = time.perf_counter()
    res = attr.attribute(inp, target=target, perturbations_per_eval=256)
    t_exact = time.perf_counter() - start
    one = MultimodalLLMAttribution(ExactShapleyValues(llama), llama)
    full = ChatInput(
        Chat().system("You are a helpful assistant.").user(words), llama, groups=[0] * 16
    )
    start = time.perf_counter()
    for _ in range(20):  # a single coalition at a time: two forwards (empty and full) each
        one.attribute(full, target=target, reuse_prefix=False, cache_coalitions=False)
    t_single = (time.perf_counter() - start) / 40
    print(
        f"\nexact Shapley, {inp.n_itp_features} words on the tiny Llama: {res.n_unique_coalitions} "
        f"coalitions in {t_exact:.1f} s = {t_exact / t_single:.0f} single forwards "
        f"({t_single * 1000:.1f} ms each; n * n! would be {16 * math.factorial(16):.1e})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    all_games = games(args.skip_real)
    runs = methods()
    print(f"\nrelative L2 error vs exact (mean ± sd over {args.seeds} seeds), Spearman, ms a run")
    summary: dict[str, dict[str, float]] = {}
    for game, (table, _) in all_games.items():
        n = table.n
        print(f"\n{game} (n = {n})")
        print(f"{'method':30s}" + "".join(f"{f'{k}n':>22s}" for k in (2, 5, 10, 20)))
        for name, run in runs.items():
            cells = []
            for k in (2, 5, 10, 20):
                mean, sd, rho, secs = evaluate(run, table, k * n, args.seeds)
                cells.append(f"{mean:7.3f}±{sd:5.3f} {rho:4.2f} {1000 * secs:5.0f}")
                if k == 10:
                    summary.setdefault(game, {})[name] = mean
            print(f"{name:30s}" + "".join(f"{c:>22s}" for c in cells))
    print("\nat 10n coalitions: Captum ShapleyValueSampling's error / ours; best shapiq's / ours")
    bests = {}
    for game, errors in summary.items():
        mine = min((v, k) for k, v in errors.items() if k.startswith("ours"))
        bests[game] = mine[1]
        shapiq_best = min(
            (v for k, v in errors.items() if k.startswith("shapiq")), default=float("nan")
        )
        ratio = errors["captum ShapleyValueSampling"] / mine[0]
        vs_shapiq = shapiq_best / mine[0]
        print(
            f"  {game:12s} {mine[1]:26s} {ratio:6.1f}x vs Captum SVS, {vs_shapiq:5.2f}x vs shapiq"
        )
    exact_cost()
    if "smollm2" in all_games:
        table, real = all_games["smollm2"]
        time_to_accuracy(table, real, bests["smollm2"], max(3, args.seeds // 2))


if __name__ == "__main__":
    main()
