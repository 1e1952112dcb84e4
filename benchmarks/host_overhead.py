"""Host work per coalition: what an explanation costs when the model costs nothing.

On a GPU, at 256 coalitions a forward, our batched scoring was paced by the
host (``gpu.py --profile``: the kernels of an exact run on a 1B Llama took
1.14 s of its 1.9 s, and the host barely waited for them). The host's share is
the model's own Python, once a forward, and our work per coalition around it.
This measures both on any machine: the same chat as ``gpu.py``
(13 words, 11-token target) on a Llama of one layer, 32 wide, scored through
the accelerator's code path (``deterministic=False``: packed rows, grouped
attention, no length buckets), whose matrix products cost next to nothing.

Rows, microseconds per coalition, best of 3: stock Captum's
``LLMAttribution(ShapleyValueSampling)`` sequence path; ours, exact Shapley
(2^13 coalitions) at 1,024 coalitions a call (the accelerator default) and at
256, each call one forward as under a GPU's token budget. The forwards of one
explanation are counted (after a first one, which probes the model). Even this
model's CPU kernels take a good part of ours' time, so the ``outside`` column
gives the time outside the model's decoder and head: the host's work a GPU run
cannot hide behind its kernels. ``--profile`` prints where ours spends it
(cProfile, own time).

Run: ``python benchmarks/host_overhead.py [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time
from collections.abc import Callable

import torch
from captum.attr import LLMAttribution, ShapleyValueSampling
from host import best_ms, describe
from text_vs_captum import SYSTEM, TARGET, USER  # the chat of gpu.py, too
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from captum_mllm import Chat, ChatInput, HFCausalLMAdapter
from captum_mllm import MultimodalLLMAttribution as Ours
from captum_mllm.captum_compat import text_template_input
from captum_mllm.methods import ExactShapleyValues
from captum_mllm.testing import tiny_tokenizer

NEARLY_FREE = dict(
    hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=600,
)  # fmt: skip
#: A GPU's token budget holds a call of 1,024 of these rows in one forward (an
#: H100's, :func:`~captum_mllm.models.batching.default_token_budget`, about
#: 130,000 for a 1B Llama); the CPU's 8,192 would cut it into four.
GPU_TOKENS = 1 << 17


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="where ours spends its time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe())
    tok = tiny_tokenizer()
    config = LlamaConfig(
        **NEARLY_FREE, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    adapter = HFCausalLMAdapter(model, tok)
    adapter.deterministic = False  # the accelerator's code path
    adapter.max_batch_tokens = GPU_TOKENS  # a call of 1,024 coalitions stays one forward
    inp = ChatInput(Chat().system(SYSTEM).user(USER), adapter)
    target = torch.tensor(tok.encode(TARGET, add_special_tokens=False))
    n = inp.n_itp_features

    stock = LLMAttribution(ShapleyValueSampling(model), tok)
    call = functools.partial(
        stock.attribute,
        text_template_input(inp),
        target=target,
        forward_in_tokens=False,
        n_samples=4,
    )
    calls: list[int] = []  # forwards of the decoder: Captum calls the model's .forward
    hook = model.model.register_forward_pre_hook(lambda *_: calls.append(1))
    call()
    hook.remove()
    rows = [("stock Captum sequence path", best_ms(call, args.repeats), len(calls))]
    ours = Ours(ExactShapleyValues(adapter), adapter)
    outside, forwards = {}, {rows[0][0]: len(calls)}
    for per_call in (1024, 256):
        call = functools.partial(
            ours.attribute, inp, target=target, perturbations_per_eval=per_call
        )
        call()  # the adapter's one-time probes of the model are not counted
        calls.clear()
        hook = model.model.register_forward_pre_hook(lambda *_: calls.append(1))
        count = call().n_unique_coalitions
        hook.remove()
        name = f"captum-mllm, exact 2^n, {per_call} a call"
        forwards[name] = len(calls)
        rows.append((name, best_ms(call, args.repeats), count))
        outside[name] = outside_model_ms(call, [model.model, model.lm_head], args.repeats)
        if args.profile and per_call == 1024:
            prof = cProfile.Profile()
            prof.runcall(call)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    print(f"\nLlama of {sum(p.numel() for p in model.parameters())} parameters, {n} words")
    head = (
        f"{'run':40s} {'coalitions':>10s} {'forwards':>8s} {'us/coalition':>13s} {'vs stock':>9s}"
    )
    print(f"{head} {'outside':>8s}")
    stock_us = 1e3 * rows[0][1] / rows[0][2]
    for name, ms, count in rows:
        us = 1e3 * ms / count
        out = f"{1e3 * outside[name] / count:8.1f}" if name in outside else ""
        print(f"{name:40s} {count:10d} {forwards[name]:8d} {us:13.1f} {stock_us / us:8.1f}x {out}")
    print("outside: us a coalition outside the model's decoder and head (best of the repeats)")


def outside_model_ms(fn: Callable[[], object], modules: list[nn.Module], repeats: int) -> float:
    """Best wall time of ``repeats`` calls less the time spent inside ``modules``'
    forwards, in milliseconds: the host's own work, without the tiny model's
    CPU kernels that a GPU would run while the host goes on."""
    inside = [0.0]
    began: list[float] = []

    def enter(*_: object) -> None:
        began.append(time.perf_counter())

    def leave(*_: object) -> None:
        inside[0] += time.perf_counter() - began.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in modules]
    hooks += [m.register_forward_hook(leave) for m in modules]
    try:
        fn()
        best = float("inf")
        for _ in range(repeats):
            inside[0] = 0.0
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start - inside[0])
    finally:
        for h in hooks:
            h.remove()
    return 1000 * best


if __name__ == "__main__":
    main()
