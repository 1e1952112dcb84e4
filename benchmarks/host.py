"""The machine a CPU benchmark ran on, printed before its table.

Ratios against stock Captum move with the host, not only with our code: the
same code gave SmolLM2 4.4x-4.6x on one day's 2-core host and 5.7x-6.8x on
another's (an AMD EPYC), where stock Captum's one-coalition forwards took
about 1.9 times as long and our batched ones 1.4 times. The float32 product
rate at SmolLM2's MLP shape bounds a FLOP-bound run, so it is printed too.

Run: imported by the other benchmarks; ``python benchmarks/host.py`` prints the line.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up, in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def product_gflops(rows: int, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """GFLOPS of ``rows`` x 576 times 576 x 1536 (SmolLM2's MLP), best of ``repeats``."""
    a, w = torch.randn(rows, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    ms = best_ms(lambda: torch.nn.functional.linear(a, w), repeats)
    return 2 * rows * 576 * 1536 / ms / 1e6


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), family and model where given."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def describe() -> str:
    """One line: CPU, cores, torch threads and version, float32 product rate."""
    rate = product_gflops(800, repeats=50)
    return (
        f"host: {cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; float32 product at 800 rows {rate:.0f} GFLOPS"
    )


if __name__ == "__main__":
    print(describe())
