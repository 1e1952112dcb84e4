"""Batches of variable-length rows, shared by the adapters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def pad_rows(
    rows: list[Tensor],
    fill: float | int = 0,
    left: bool = False,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Stack rows of different lengths: ids ``(n,)`` or embeddings ``(n, D)``.

    Right padding (the default) cannot change a causal model's outputs at the
    real positions; generation pads on the left so that every row ends together.

    Args:
        rows (list of Tensor): B rows.
        fill (float or int, optional): padding value. Default: 0
        left (bool, optional): pad on the left. Default: False
        device (torch.device, optional): Default: the first row's.

    Returns:
        tuple: ``(padded (B, W, ...), attention mask (B, W) long)``.
    """
    device = device or rows[0].device
    width = max(len(r) for r in rows)
    padded = torch.full(
        (len(rows), width, *rows[0].shape[1:]), fill, dtype=rows[0].dtype, device=device
    )
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        padded[b, span] = row.to(device)
        mask[b, span] = 1
    return padded, mask


def length_buckets(sorted_lens: list[int], call_cost: int) -> list[int]:
    """Cut ascending row lengths into right-padded batches of least total cost.

    A batch costs its padded token count plus ``call_cost`` tokens' worth of
    per-call overhead; on a CPU the forward's time follows its token count.

    Returns:
        list of int: end index of each batch, the last one ``len(sorted_lens)``.
    """
    n = len(sorted_lens)
    best = [0] * (n + 1)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = min(
            (best[i] + (j - i) * sorted_lens[j - 1] + call_cost, i) for i in range(j)
        )
    ends = []
    j = n
    while j > 0:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


def by_length(
    rows: list[Tensor],
    extra: int,
    call_cost: int,
    score: Callable[[list[Tensor]], Tensor],
    pad: bool = True,
) -> Tensor:
    """Score rows in groups of similar length, one ``score`` call per group.

    Args:
        rows (list of Tensor): B rows.
        extra (int): tokens every row gets appended (the target).
        call_cost (int): see :func:`length_buckets`.
        score (callable): ``list of rows -> (b, k)``.
        pad (bool, optional): allow rows of different lengths in one group
            (right padding, exact for causal models only); else each group
            holds rows of one length. Default: True

    Returns:
        Tensor: ``(B, k)`` in the rows' order.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    lens = [len(rows[i]) for i in order]
    if pad:
        ends = length_buckets([n + extra for n in lens], call_cost)
    else:
        ends = [i + 1 for i in range(len(lens)) if i + 1 == len(lens) or lens[i + 1] != lens[i]]
    parts, begin = [], 0
    for end in ends:
        parts.append(score([rows[i] for i in order[begin:end]]))
        begin = end
    out = torch.cat(parts)
    return out[torch.argsort(torch.tensor(order, device=out.device))]


def default_call_cost(device: torch.device) -> int:
    """Per-forward overhead in tokens: on CPU a forward reads every weight once
    (~80 tokens of compute for a 10M model on 2 cores, measured); on an
    accelerator one batch is always best."""
    return 80 if device.type == "cpu" else 1 << 30
