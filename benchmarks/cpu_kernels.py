"""What a CPU forward costs, the figures behind the CPU batching choices.

1. Matrix products of SmolLM2's MLP shape (576 x 1536) by number of rows, in
   float32 and bfloat16: a product of a few hundred rows or fewer runs well
   below full speed, which is why ``default_call_cost`` never counts a CPU
   call as less than 64 tokens.
2. Coalitions packed into one row (a block-diagonal 4D mask, per-segment
   position ids) against the same rows right-padded, one forward each, on the
   tiny Llama and SmolLM2: tokens pushed, milliseconds, and the largest logit
   difference. Packing is not used on the CPU: a segment's attention sums
   shift with its offset, so values would depend on the batch.

Run: ``python benchmarks/cpu_kernels.py [--threads N] [--skip-real]``.
"""

from __future__ import annotations

import argparse

import torch
from host import best_ms, describe, product_gflops

from captum_mllm import load_default_model
from captum_mllm.testing import tiny_hf_adapter

ROWS = (20, 50, 100, 200, 400, 800, 1600)


def matmul_table(repeats: int) -> None:
    print("matrix product 576 -> 1536 (SmolLM2's MLP), GFLOPS by rows")
    print(f"{'rows':>6s} {'float32':>9s} {'bfloat16':>9s}")
    for m in ROWS:
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            cells.append(product_gflops(m, dtype, repeats))
        print(f"{m:6d} {cells[0]:9.0f} {cells[1]:9.0f}")


def packed_vs_padded(model: torch.nn.Module, lens: list[int], repeats: int) -> dict[str, float]:
    """One forward of rows of ``lens`` tokens, right-padded and packed."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 500, (n,), generator=g) for n in lens]
    width = max(lens)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    packed = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    causal = torch.arange(len(segment))[:, None] >= torch.arange(len(segment))[None, :]
    allowed = (segment[:, None] == segment[None, :]) & causal
    block = torch.zeros(1, 1, len(segment), len(segment))
    block.masked_fill_(~allowed, torch.finfo(torch.float32).min)

    def padded() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    def packed_forward() -> torch.Tensor:
        return model(input_ids=packed, attention_mask=block, position_ids=positions).logits

    with torch.inference_mode():
        a, p = padded(), packed_forward()
        starts = torch.tensor([0, *lens]).cumsum(0)
        diff = max(
            (a[b, :n] - p[0, starts[b] : starts[b] + n]).abs().max().item()
            for b, n in enumerate(lens)
        )
        return {
            "padded_tokens": len(rows) * width,
            "packed_tokens": len(segment),
            "padded_ms": best_ms(padded, repeats),
            "packed_ms": best_ms(packed_forward, repeats),
            "max_logit_diff": diff,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, help="default: torch's own setting")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-real", action="store_true", help="no SmolLM2 row")
    args = parser.parse_args(argv)
    if args.threads:  # setting it at all changes float rounding in later work of the process
        torch.set_num_threads(args.threads)
    print(describe())
    matmul_table(args.repeats)
    lens = torch.randint(12, 36, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    models = {"tiny Llama": lambda: tiny_hf_adapter(hidden_size=384, num_layers=7).model}
    if not args.skip_real:
        models["SmolLM2-135M"] = lambda: load_default_model().model
    threads = torch.get_num_threads()
    print(f"\n16 coalitions of 12-35 tokens, one forward, padded and packed ({threads} threads)")
    for name, build in models.items():
        r = packed_vs_padded(build().eval(), lens, args.repeats)
        print(
            f"{name:14s} padded {r['padded_tokens']:.0f} tokens {r['padded_ms']:7.1f} ms, packed "
            f"{r['packed_tokens']:.0f} tokens {r['packed_ms']:7.1f} ms; max |logit diff| "
            f"{r['max_logit_diff']:.1e}"
        )


if __name__ == "__main__":
    main()
