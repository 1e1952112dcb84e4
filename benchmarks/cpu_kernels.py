"""What a CPU forward costs, the figures behind the CPU batching choices.

1. Matrix products of SmolLM2's MLP shape (576 x 1536) by number of rows, in
   float32 and bfloat16: a product of a few hundred rows or fewer runs well
   below full speed, which is why ``default_call_cost`` never counts a CPU
   call as less than 64 tokens.
2. 16 coalitions of different lengths scored in one forward, right-padded and
   packed into one row (``captum_mllm.models.packing``: attention alone
   unpacks them), on the tiny Llama and SmolLM2: tokens pushed, milliseconds,
   and whether the scores are the same to the bit.

Run: ``python benchmarks/cpu_kernels.py [--threads N] [--skip-real]``.
"""

from __future__ import annotations

import argparse

import torch
from host import best_ms, describe, product_gflops

from captum_mllm import HFCausalLMAdapter, load_default_model
from captum_mllm.models.batching import MIN_PRODUCT_ROWS
from captum_mllm.models.packing import PackedRows
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


def packed_vs_padded(model: HFCausalLMAdapter, lens: list[int], repeats: int) -> dict[str, float]:
    """Rows of ``lens`` tokens and a 4-token answer scored in one forward,
    right-padded and packed, as the adapter scores a batch."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 500, (n,), generator=g) for n in lens]
    response = model.response(torch.arange(20, 24))
    fed = len(response) - 1

    def score(packing: bool) -> torch.Tensor:
        model.packing = packing
        with model._attention():  # as the adapter's batches run (the math kernel on a CPU)
            return model._score_rows(rows, response, 0, len(response), None)

    assert model.packs(), "this model does not pass the packing probe"
    padded, packed = score(False), score(True)
    return {
        "padded_tokens": len(rows) * max(max(lens) + fed, MIN_PRODUCT_ROWS),
        # what the packed forward pushes: each distinct start of a row once
        "packed_tokens": PackedRows.of([torch.cat([r, response.ids[:-1]]) for r in rows])[0].real,
        "padded_ms": best_ms(lambda: score(False), repeats),
        "packed_ms": best_ms(lambda: score(True), repeats),
        "bit_identical": float(torch.equal(padded, packed)),
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
    models = {"tiny Llama": lambda: tiny_hf_adapter(hidden_size=384, num_layers=7)}
    if not args.skip_real:
        models["SmolLM2-135M"] = load_default_model
    threads = torch.get_num_threads()
    print(
        "\n16 coalitions of 12-35 tokens and a 4-token answer, one forward, padded and "
        f"packed ({threads} threads)"
    )
    for name, build in models.items():
        r = packed_vs_padded(build(), lens, args.repeats)
        same = "the same to the bit" if r["bit_identical"] else "NOT the same"
        print(
            f"{name:14s} padded {r['padded_tokens']:.0f} tokens {r['padded_ms']:7.1f} ms, packed "
            f"{r['packed_tokens']:.0f} tokens {r['packed_ms']:7.1f} ms; scores {same}"
        )


if __name__ == "__main__":
    main()
