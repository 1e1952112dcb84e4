"""Batch building: padding with a suffix, and the least-cost cut into length buckets."""

from __future__ import annotations

import itertools

import pytest
import torch

from captum_mllm.models.batching import length_buckets, pad_rows


def test_pad_rows_appends_the_suffix_after_each_row() -> None:
    rows = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([], dtype=torch.long)]
    ids, mask = pad_rows(rows, fill=0, suffix=torch.tensor([9, 8]))
    for b, row in enumerate(rows):
        n = len(row) + 2
        assert ids[b, :n].tolist() == [*row.tolist(), 9, 8]
        assert mask[b].tolist() == [1] * n + [0] * (ids.shape[1] - n)
    ids, mask = pad_rows(rows[:2], fill=7, left=True)
    assert ids.tolist() == [[1, 2, 3], [7, 7, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _cost(lens: list[int], ends: list[int], call_cost: int) -> int:
    begin, total = 0, 0
    for end in ends:
        total += (end - begin) * lens[end - 1] + call_cost
        begin = end
    return total


@pytest.mark.parametrize("call_cost", [0, 3, 20, 1000])
def test_length_buckets_is_the_cheapest_cut(call_cost: int) -> None:
    g = torch.Generator().manual_seed(call_cost)
    for _ in range(20):
        lens = sorted(torch.randint(1, 30, (7,), generator=g).tolist())
        ends = length_buckets(lens, call_cost)
        assert ends[-1] == len(lens) and ends == sorted(set(ends))
        brute = min(
            _cost(lens, [*cuts, len(lens)], call_cost)
            for k in range(len(lens))
            for cuts in itertools.combinations(range(1, len(lens)), k)
        )
        assert _cost(lens, ends, call_cost) == brute
