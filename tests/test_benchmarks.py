"""Benchmark scripts under test: the GPU scripts run end to end on the CPU
(the benchmark on tiny shapes), so they cannot rot before a GPU is lent, and
the benchmark's rows agree with the stock paths they time; the host benchmark
counts what it divides by; the CPU kernels
benchmark packs without changing scores; the oracle bound's pieces agree with
brute force."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def _load(name: str):
    folder = Path(__file__).parent.parent / "benchmarks"
    if str(folder) not in sys.path:  # benchmarks import each other, as scripts do
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_on_tiny_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    _load("gpu").main(["--tiny", "--device", "cpu"])
    _load("gpu").main(["--tiny", "--device", "cpu", "--sweep", "--skip", "lfm2"])
    out = capsys.readouterr().out
    # Ours at the stock budget gives the stock sequence path's values (float32 here).
    same = re.search(r"same budget: max \|token_attr - stock sequence path\| (\S+)", out)
    assert same is not None and float(same.group(1)) < 1e-4
    loop = re.search(r"the same 8 coalitions: max \|log-prob difference\| (\S+)", out)
    assert loop is not None and float(loop.group(1)) < 1e-4
    for row in [
        "stock Captum sequence path",
        "stock Captum default path",
        "captum-mllm, exact 2^n, batched",
        "plain forward",
        "stock liquid-audio, one at a time",
        "captum-mllm, paired permutations",
        "captum-mllm, paired, new shapes",
        "captum-mllm, paired, new shapes, cuDNN",
        "ExactShapleyValues, 256 a forward",  # --sweep
        "ExactShapleyValues, 1024 a forward",
    ]:
        line = next(ln for ln in out.splitlines() if ln.startswith(row))
        ms = float(line[40:].split()[1])
        assert ms > 0, line


def test_cpu_kernels_benchmark_packs_without_changing_scores(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _load("cpu_kernels").main(["--skip-real", "--repeats", "1"])
    out = capsys.readouterr().out
    row = re.search(
        r"tiny Llama +padded (\d+) tokens .* packed (\d+) tokens .* scores (.+)$", out, re.M
    )
    assert row is not None, out
    assert int(row.group(2)) < int(row.group(1))  # no padding pushed
    assert row.group(3) == "the same to the bit"
    assert re.search(r"^ +1600 +\d+ +\d+$", out, re.M)  # the matrix product table is complete
    # the host line comes first, with this process's threads and a product rate
    host = re.match(r"host: (.+), (\d+) CPUs, (\d+) torch threads, .* (\d+) GFLOPS\n", out)
    assert host is not None, out
    assert int(host.group(3)) == torch.get_num_threads() and int(host.group(4)) > 0


def test_host_overhead_counts_every_coalition(capsys: pytest.CaptureFixture[str]) -> None:
    """The host benchmark's rows: stock Captum's forwards counted (one for the
    baseline, then n for each of its 4 orders over 13 words) and ours' 2^13,
    1,024 or 256 coalitions a forward (as on a GPU, not cut by the CPU's token
    budget), and a time outside the model. (That time comes from other runs
    than the whole's, so the two are not compared: a busy machine made the
    part exceed the whole.)"""
    threads = str(torch.get_num_threads())  # the script sets them for the whole process
    _load("host_overhead").main(["--repeats", "1", "--threads", threads])
    out = capsys.readouterr().out
    counts, forwards = {}, {}
    for row in ("stock Captum sequence path", "captum-mllm, exact 2^n, 1024 a call",
                "captum-mllm, exact 2^n, 256 a call"):  # fmt: skip
        line = next(ln for ln in out.splitlines() if ln.startswith(row))
        count, forwards[row], us, *rest = line[40:].split()
        counts[row] = int(count)
        assert float(us) > 0, line
        if rest[1:]:  # ours: the time outside the model's forwards
            assert float(rest[1]) > 0, line
    assert counts == {
        "stock Captum sequence path": 1 + 4 * 13,
        "captum-mllm, exact 2^n, 1024 a call": 2**13,
        "captum-mllm, exact 2^n, 256 a call": 2**13,
    }
    assert forwards["stock Captum sequence path"] == "53"
    # one forward for the chat's prefix, then one a call
    assert forwards["captum-mllm, exact 2^n, 1024 a call"] == str(1 + 2**13 // 1024)
    assert forwards["captum-mllm, exact 2^n, 256 a call"] == str(1 + 2**13 // 256)


def test_gpu_parity_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU parity script, pointed at the CPU: every path runs, no NaN, and
    float32 repeats the reference bit for bit (two fresh adapters)."""
    _load("gpu_parity").main(["--device", "cpu"])
    rows = [
        ln.split()
        for ln in capsys.readouterr().out.splitlines()
        if ln.startswith(("llama", "lfm2"))
    ]
    assert len(rows) == 2 * 2 * 3
    assert all(row[-3] == "False" for row in rows)
    assert all(float(row[-2]) == 0 for row in rows if row[1] == "float32")


def test_oracle_bound_reads_a_game_s_spectrum_right() -> None:
    """The oracle's pieces against brute force on a random 5-player game: the
    Walsh coefficients give every value back, their odd part what a coalition
    and its complement observe, their Shapley values the exact ones; with every
    pair observed the oracle's posterior is exact, and its design is distinct
    coalitions after the empty one."""
    bound = _load("oracle_bound")
    n = 5
    values = np.random.default_rng(0).normal(size=2**n)
    c = bound.walsh(values)
    masks = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    x = np.where(masks, 1.0, -1.0)
    terms = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    chi = np.array([[np.prod(row[t]) for t in terms] for row in x])  # prod over the empty T: 1
    np.testing.assert_allclose(chi @ c, values, atol=1e-12)
    odd = bound.OddTerms(n)
    np.testing.assert_allclose(
        odd.chi(masks) @ c[odd.codes], bound.odd_part(values, masks), atol=1e-12
    )
    exact = bound.Table(values, n).exact
    np.testing.assert_allclose(odd.shapley.T @ c[odd.codes], exact, atol=1e-12)
    half = masks.sum(1) <= n // 2  # n odd: one side of every pair
    prior = np.linspace(0.5, 2.0, len(odd.codes))  # any prior, when every pair is seen
    phi = odd.posterior_phi(prior, masks[half], bound.odd_part(values, masks[half]))
    np.testing.assert_allclose(phi, exact, atol=1e-6)
    design = bound.oracle_design(odd, c[odd.codes] ** 2, n, 6, np.random.default_rng(1))
    assert len(design) == 7 and not design[0].any()
    assert len(np.unique(design, axis=0)) == 7


def test_paths_and_steps_prints_the_gaps_the_readme_cites(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Integrated gradients' gap falls with n_steps; on GPT-2 ours is stock's
    sequence path, and so is stock's token path without its cache, but not
    with it (its default)."""
    _load("paths_and_steps").main(["--quick"])
    out = capsys.readouterr().out
    gaps = re.search(r"tiny Llama\s+8: (\S+)\s+200: (\S+)", out)
    assert gaps is not None and float(gaps.group(1)) > 0.05 > float(gaps.group(2))
    row = re.search(r"GPT2Config\s+(\S+)\s+(\S+)\s+(\S+)", out)
    assert row is not None  # stock's cached token path is off; without its cache, and ours, not
    cached, uncached, ours = (float(g) for g in row.groups())
    assert max(uncached, ours) < 1e-5 < cached
