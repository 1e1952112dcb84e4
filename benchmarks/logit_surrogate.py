"""Does a surrogate fitted to the answer's logits beat Kernel SHAP at 10n? (issue 17)

A log-probability game is ``sum_t log softmax(z_t(S))[y_t]``: the log-softmax
is non-linear, so if the logits ``z_t`` were close to additive in the features,
a surrogate additive in the logits (every vocabulary entry a least-squares fit
on the sampled coalitions, passed through the log-softmax) would hold the
game's interactions, its Shapley values could be taken exactly over all 2^n
coalitions, and Kernel SHAP on the residuals would correct what it misses.

On the SmolLM2 game of ``estimators.py`` (the same question and greedy
answer), each coalition's logits at the answer positions are kept over the
tokens that rank in the top 48 of the whole or the empty chat at some
position (and the answer's own), the rest as one log-mass. At 10n coalitions
(pairs with their complements, sizes drawn from the Shapley kernel), over
seeds, it prints the relative error of the surrogate alone, the corrected
surrogate, Kernel SHAP on the same coalitions (``kernel._pair_lstsq``),
``LeverageKernelShap`` and ``BayesianShapley``, and the share of the game's
variance the additive logit fit explains.

Run: ``python benchmarks/logit_surrogate.py [--seeds 5]`` (about 6 minutes on
2 CPU cores: every coalition's logits once).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from estimators import QUESTION, Table, error
from host import describe

from captum_mllm import Chat, ChatInput, MultimodalLLMAttribution, load_default_model
from captum_mllm.captum_compat import text_template_input
from captum_mllm.methods import BayesianShapley, ExactShapleyValues, LeverageKernelShap
from captum_mllm.methods.kernel import _pair_lstsq

TOP = 48  # tokens kept a position, from the whole and from the empty chat


def logits_game() -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Every coalition's game value, its logits over the kept tokens, the
    log-mass of the others, and the answer's places among the kept tokens."""
    smol = load_default_model()
    model, tokenizer = smol.model, smol.tokenizer
    inp = ChatInput(Chat().user(QUESTION), smol)
    answer = MultimodalLLMAttribution(ExactShapleyValues(smol), smol).attribute(
        ChatInput(Chat().user(QUESTION), smol, groups=[0] * 12), gen_args={"max_new_tokens": 12}
    )
    y = answer.target_ids.reshape(-1)
    n, length = inp.n_itp_features, len(y)
    template = text_template_input(inp)
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    ids = [
        tokenizer(template.to_model_input(torch.tensor(m)[None]), add_special_tokens=False,
                  return_tensors="pt").input_ids[0]
        for m in masks
    ]  # fmt: skip

    @torch.inference_mode()
    def logits(rows: list[torch.Tensor]) -> torch.Tensor:  # rows of one length: no padding
        batch = torch.stack([torch.cat([r, y]) for r in rows])
        return model(batch).logits[:, -length - 1 : -1].float()

    ends = torch.cat([logits([ids[0]]), logits([ids[-1]])])
    kept = sorted(set(y.tolist()) | set(ends.topk(TOP, dim=-1).indices.flatten().tolist()))
    kept_t = torch.tensor(kept)
    answer_at = torch.tensor([kept.index(t) for t in y.tolist()])
    z = torch.zeros(2**n, length, len(kept))
    rest = torch.zeros(2**n, length)
    values = np.zeros(2**n)
    by_length = defaultdict(list)
    for i, row in enumerate(ids):
        by_length[len(row)].append(i)
    for group in by_length.values():
        for start in range(0, len(group), 64):
            part = group[start : start + 64]
            out = logits([ids[i] for i in part])
            total = out.logsumexp(-1)
            z[part] = out[:, :, kept_t]
            mass = (total.exp() - z[part].exp().sum(-1)).clamp_min(1e-30)
            rest[part] = mass.log()
            picked = out.gather(2, y[None, :, None].expand(len(part), length, 1))[..., 0]
            values[part] = (picked - total).sum(1).numpy()
    print(f"  answer {answer.response_text!r}; {len(kept)} tokens kept a position")
    return values, z.double(), rest.double(), answer_at, n


def design(n: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """``budget`` coalitions: none, all, then pairs with sizes from the Shapley kernel."""
    sizes = np.arange(1, n)
    p = 1.0 / (sizes * (n - sizes))
    rows = [np.zeros(n), np.ones(n)]
    while len(rows) < budget:
        mask = np.zeros(n)
        mask[rng.choice(n, rng.choice(sizes, p=p / p.sum()), replace=False)] = 1
        rows += [mask, 1 - mask]
    return np.array(rows[:budget])


def kernel_shap(masks: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Kernel SHAP on the sampled pairs (rows 2, 3 / 4, 5 / ...), made efficient."""
    pairs, half = masks[2::2].copy(), (values[2::2] - values[3::2]) / 2
    big = pairs.sum(1) > masks.shape[1] / 2  # each pair by its smaller side, as the solver's
    pairs[big], half[big] = 1 - pairs[big], -half[big]
    return _pair_lstsq(pairs, half[:, None], np.ones(len(pairs)), values[:1], values[1:2])[0]


def surrogate(masks, index, z, rest, answer_at, n) -> np.ndarray:
    """The additive logit fit's game value over all 2^n coalitions."""
    x = torch.tensor(np.concatenate([np.ones((len(masks), 1)), masks], axis=1))
    targets = torch.cat([z[index], rest[index][..., None]], -1).reshape(len(masks), -1)
    ridge = 1e-3 * torch.eye(x.shape[1], dtype=x.dtype)
    ridge[0, 0] = 0
    coef = torch.linalg.solve(x.T @ x + ridge, x.T @ targets)
    every = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    out = np.zeros(2**n)
    positions = torch.arange(z.shape[1])
    for start in range(0, 2**n, 512):
        rows = torch.tensor(np.concatenate([np.ones((512, 1)), every[start : start + 512]], 1))
        fit = (rows @ coef).reshape(512, z.shape[1], -1)
        out[start : start + 512] = (fit[:, positions, answer_at] - fit.logsumexp(-1)).sum(1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    values, z, rest, answer_at, n = logits_game()
    table = Table(values, n)
    budget, bits = 10 * n, 1 << np.arange(n)
    ones = torch.ones(1, n, dtype=torch.float64)
    errors: dict[str, list[float]] = defaultdict(list)
    explained = []
    for seed in range(args.seeds):
        masks = design(n, budget, np.random.default_rng(seed))
        index = masks.astype(np.int64) @ bits
        fitted = surrogate(masks, index, z, rest, answer_at, n)
        explained.append(1 - np.var(values - fitted) / np.var(values))
        phi = Table(fitted, n).exact
        errors["surrogate alone"].append(error(phi, table.exact))
        corrected = phi + kernel_shap(masks, values[index] - fitted[index])
        errors["surrogate + Kernel SHAP on residuals"].append(error(corrected, table.exact))
        errors["Kernel SHAP, same coalitions"].append(
            error(kernel_shap(masks, values[index]), table.exact)
        )
        for cls in (LeverageKernelShap, BayesianShapley):
            phi = cls(table).attribute(ones, budget=budget, seed=seed)[0].numpy()
            errors[cls.__name__].append(error(phi, table.exact))
    print(f"\nSmolLM2, {n} words, {budget} coalitions, mean relative error over {args.seeds} seeds")
    for name, values_ in errors.items():
        print(f"  {name:40s} {np.mean(values_):.4f} (spread {np.std(values_):.4f})")
    print(f"  the additive logit fit explains {np.mean(explained):.1%} of the game's variance")


if __name__ == "__main__":
    main()
