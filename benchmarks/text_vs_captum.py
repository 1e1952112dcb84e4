"""Text chat: MultimodalLLMAttribution against stock Captum LLMAttribution.

A ~9M-parameter tiny Llama (a ~60-token system prompt, a 12-word user
message, a 12-token target), then the real SmolLM2-135M-Instruct (12 words,
after a one-sentence system prompt, then after the tiny chat's; the second
against stock Captum's sequence path only), ShapleyValueSampling with
n_samples=10. Times stock Captum
(forward_in_tokens=True and False, on the same chat through
``text_template_input``) and ours (perturbations_per_eval=64, as the README
suggests) in one process, checks the attributions agree, and prints ratios and
model-call counts; then the floor ours cannot beat on this host, its matrix
products' FLOPs (counted by torch's FlopCounterMode) at the host's float32
product rate (printed first, with the CPU: ratios move with the host).

Run: ``make bench`` or ``python benchmarks/text_vs_captum.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from captum.attr import LLMAttribution, ShapleyValueSampling
from host import describe, product_gflops
from torch.utils.flop_counter import FlopCounterMode

from captum_mllm import Chat, ChatInput, MultimodalLLMAttribution, load_default_model
from captum_mllm.captum_compat import text_template_input
from captum_mllm.heap import retained_heap
from captum_mllm.testing import tiny_hf_adapter

SYSTEM = (
    "You are a helpful assistant. Answer briefly and politely. The weather today is sunny "
    "with a light breeze from the west. Music, art and science help people understand the "
    "world around them."
)
USER = "Tell me a story about a cat who lived by the sea please"
TARGET = "A spider has eight legs and the sky is blue!"  # 12 tokens
REAL_USER = "Tell me in one sentence what the capital city of France is."  # 12 words
REAL_TARGET = "The capital city of France is Paris."
N_SAMPLES = 10


class CallCounter:
    """Counts forward calls of a module (stock Captum does not report them) and
    the token positions they push: all, and those that are not padding."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = self.pushed = self.real = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _: object, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask, packed = kwargs.get("attention_mask"), kwargs.get("packed_rows")
        if ids is not None:
            self.pushed += ids.numel()
            if packed is not None:  # rows end to end (captum_mllm.models.packing)
                self.real += packed.real
            else:
                self.real += (
                    int(mask[:, -ids.shape[1] :].sum()) if mask is not None else ids.numel()
                )


def timed(fn, repeats: int = 1):
    """Best wall time of ``repeats`` runs (the machine is shared), and the last
    output; stock Captum runs under the heap setting ours enters too."""
    best = float("inf")
    for _ in range(repeats):
        torch.manual_seed(0)
        start = time.perf_counter()
        with retained_heap():
            out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def compare(model, chat, target_text: str, label: str, default_path: bool = True) -> None:
    """Stock Captum (both paths, or the sequence path only) against ours on one
    chat; prints the table."""
    tok = model.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    inp = ChatInput(chat, model)
    target_ids = torch.tensor(tok.encode(target_text, add_special_tokens=False))
    captum_inp = text_template_input(inp)  # the same game for stock Captum
    print(
        f"\n{label}: {n_params / 1e6:.1f}M parameters on {model.device}; prompt "
        f"{len(inp.encoded)} tokens (prefix {inp.prefix_len}), {inp.n_itp_features} word "
        f"features, {len(target_ids)} target tokens, ShapleyValueSampling n_samples={N_SAMPLES}"
    )
    # Captum calls ``model.forward`` directly, past module hooks: count the decoder's calls.
    counter = CallCounter(model.model.get_decoder())
    rows = []
    stock_paths = [("captum forward_in_tokens=False", False)]
    if default_path:
        stock_paths.insert(0, ("captum forward_in_tokens=True", True))
    for name, in_tokens in stock_paths:
        stock = LLMAttribution(ShapleyValueSampling(model.model), tok)
        counter.calls = 0
        repeats = 1 if in_tokens else 3  # token-by-token stock Captum is slow
        res, secs = timed(
            lambda s=stock, f=in_tokens: s.attribute(
                captum_inp, target=target_ids, forward_in_tokens=f, n_samples=N_SAMPLES
            ),
            repeats,
        )
        rows.append((name, secs, counter.calls // repeats, res))

    ours = MultimodalLLMAttribution(ShapleyValueSampling(model), model)

    def explain():
        return ours.attribute(
            inp, target=target_ids, n_samples=N_SAMPLES, perturbations_per_eval=64
        )

    res, secs = timed(explain, 3)
    rows.append(("captum-mllm ppe=64", secs, res.n_model_calls, res))
    counter.pushed = counter.real = 0
    with FlopCounterMode(display=False) as flops:  # once more, to count what one run pushes
        timed(explain)

    seq_row = rows[len(stock_paths) - 1]
    exact, seq = seq_row[3].token_attr, seq_row[1]
    default = rows[0][1] if default_path else None
    print("best of 3 runs (1 for forward_in_tokens=True); diff = max |token_attr - exact|")
    print(
        f"{'run':34s} {'seconds':>8s} {'calls':>6s} {'vs default':>11s} {'vs seq':>7s} {'diff':>9s}"
    )
    for name, secs, calls, r in rows:
        diff = (r.token_attr - exact).abs().max().item()
        vs_default = f"{default / secs:10.1f}x" if default is not None else f"{'-':>11s}"
        print(f"{name:34s} {secs:8.2f} {calls:6d} {vs_default} {seq / secs:6.1f}x {diff:9.2e}")
    print(
        f"captum-mllm evaluated {res.n_unique_coalitions} unique of {res.n_coalitions} "
        f"requested coalitions, pushing {counter.pushed} token positions "
        f"({counter.real} of them not padding)"
    )
    if model.device.type == "cpu":  # no run beats its matrix products at the host's rate
        floor = flops.get_total_flops() / (product_gflops(800, repeats=50) * 1e9)
        print(
            f"its matrix products: {flops.get_total_flops() / 1e9:.0f} GFLOP, at least "
            f"{floor:.2f} s at this host's float32 rate: stock's sequence path / that floor "
            f"= {seq / floor:.1f}x"
        )
    counter.handle.remove()  # the model is compared again on another chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-real", action="store_true", help="no SmolLM2 row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    tiny = tiny_hf_adapter(hidden_size=384, num_layers=7).to(args.device)
    compare(tiny, Chat().system(SYSTEM).user(USER), TARGET, "tiny Llama")
    if not args.skip_real:
        smol = load_default_model(device=args.device)
        chat = Chat().system("You are a helpful assistant.").user(REAL_USER)
        compare(smol, chat, REAL_TARGET, "SmolLM2-135M-Instruct")
        # The untouched prefix is what stock Captum pushes again for every
        # coalition: the same question after the tiny chat's system prompt.
        chat = Chat().system(SYSTEM).user(REAL_USER)
        label = "SmolLM2-135M-Instruct, the tiny chat's system prompt"
        compare(smol, chat, REAL_TARGET, label, default_path=False)


if __name__ == "__main__":
    main()
