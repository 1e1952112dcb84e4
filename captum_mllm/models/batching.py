"""Batches of variable-length rows, shared by the adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence


def lengths(rows: Sequence[Tensor]) -> list[int]:
    """``[len(r) for r in rows]``, read from the shapes: ``Tensor.__len__`` runs
    in Python, several times slower, and scoring asks for each coalition's
    length about six times."""
    return [r.shape[0] for r in rows]


def ints(values: Sequence[int]) -> Tensor:
    """A host int64 tensor of Python ints: through numpy, which reads a list
    of a thousand several times faster than ``torch.tensor`` does."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def pad_rows(
    rows: list[Tensor],
    fill: float | int = 0,
    left: bool = False,
    device: torch.device | None = None,
    suffix: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Stack rows of different lengths: ids ``(n,)`` or embeddings ``(n, D)``.

    Right padding (the default) cannot change a causal model's outputs at the
    real positions; generation pads on the left so that every row ends together.
    The batch is built where the rows are and moved to ``device`` once (no
    copy per row).

    Args:
        rows (list of Tensor): B rows.
        fill (float or int, optional): padding value. Default: 0
        left (bool, optional): pad on the left. Default: False
        device (torch.device, optional): Default: the first row's.
        suffix (Tensor, optional): ``(S, ...)`` appended to every row before
            right padding (the response tokens fed after each coalition). Default: None

    Returns:
        tuple: ``(padded (B, W, ...), attention mask (B, W) long)``.
    """
    home = rows[0].device
    device = device or home
    lens = to_device(ints(lengths(rows)), home)
    padded = pad_sequence(
        rows, batch_first=True, padding_value=fill, padding_side="left" if left else "right"
    )
    if suffix is not None and len(suffix):
        if left:
            raise ValueError("a suffix needs right padding")
        n = len(suffix)
        padded = torch.cat([padded, padded.new_full((len(rows), n, *padded.shape[2:]), fill)], 1)
        at = lens[:, None] + torch.arange(n, device=home)[None]
        padded[torch.arange(len(rows), device=home)[:, None], at] = suffix.to(home, padded.dtype)
        lens = lens + n
    width = torch.arange(padded.shape[1], device=home)[None]
    mask = (width >= padded.shape[1] - lens[:, None]) if left else (width < lens[:, None])
    return to_device(padded, device), to_device(mask.long(), device)


#: Fewest rows a matrix product of scoring or regeneration is given (padded
#: when fewer): the CPU BLAS takes another path for a product of a few rows
#: (1-3, 5-7 or 9-11 measured), which rounds otherwise, so a coalition's value
#: would depend on whether it was scored alone. Attention's products have as
#: many rows as the batch is wide, hence a width of at least this many positions too.
MIN_PRODUCT_ROWS = 16


#: Logits one float32 log-softmax holds at a time (512 MiB): scoring takes a
#: batch's log-softmax over the vocabulary a chunk of rows at a time, so a
#: call's float32 copies never grow with the batch (1,024 coalitions with an
#: 11-token answer over a 128k vocabulary would need two of 5.8 GB).
LOGITS_AT_ONCE = 2**27


def target_log_probs(logits: Tensor, target: Tensor) -> Tensor:
    """``(B, T, V)`` logits and ``(T,)`` target ids (on the logits' device) ->
    ``(B, T)`` float32 log-probabilities of the targets, in chunks of rows of at
    most :data:`LOGITS_AT_ONCE` logits (each row's softmax alone: the same
    values at any chunk size)."""
    _, n_target, vocab = logits.shape
    rows = max(1, LOGITS_AT_ONCE // max(n_target * vocab, 1))
    index = target[None, :, None]
    parts = [
        part.float().log_softmax(-1).gather(2, index.expand(len(part), -1, 1))[..., 0]
        for part in logits.split(rows)
    ]
    return torch.cat(parts) if parts else logits.new_zeros(0, n_target, dtype=torch.float32)


def with_rows(x: Tensor, rows: int = MIN_PRODUCT_ROWS) -> Tensor:
    """``x`` with zero rows appended along its first dimension up to ``rows``
    (see :data:`MIN_PRODUCT_ROWS`); callers keep the first ``len(x)`` outputs."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x.new_zeros(rows - len(x), *x.shape[1:])])


@contextlib.contextmanager
def enough_rows(module: nn.Module) -> Iterator[None]:
    """Within: every ``nn.Linear`` in ``module`` multiplies at least
    :data:`MIN_PRODUCT_ROWS` rows (zero rows appended, their outputs dropped).
    Generation multiplies as many rows as prompts it continues together (the
    head of its first step and every decode step), so a row's answer would
    otherwise depend on how many were generated beside it."""

    shapes: dict[nn.Module, torch.Size] = {}

    def pad(layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None  # (an input passed by keyword is left alone)
        if x is None or x.numel() >= MIN_PRODUCT_ROWS * x.shape[-1]:
            return None
        shapes[layer] = x.shape
        return (with_rows(x.reshape(-1, x.shape[-1])), *args[1:])

    def drop(layer: nn.Module, _: tuple[Any, ...], out: Tensor) -> Tensor | None:
        shape = shapes.pop(layer, None)
        if shape is None:
            return None
        return out[: shape[:-1].numel()].reshape(*shape[:-1], out.shape[-1])

    handles = []
    for layer in module.modules():
        # nn.Linear's own product only: a subclass with its own forward (Llama 4's
        # and PhiMoE's routers return tuples) is left as it is
        if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
            handles += [layer.register_forward_pre_hook(pad), layer.register_forward_hook(drop)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def widened(padded: Tensor, mask: Tensor, fill: float | int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded rows ``(B, W, ...)`` and their mask made at least
    :data:`MIN_PRODUCT_ROWS` positions wide (more right padding: for a causal
    model no value changes)."""
    short = MIN_PRODUCT_ROWS - padded.shape[1]
    if short <= 0:
        return padded, mask
    extra = padded.new_full((len(padded), short, *padded.shape[2:]), fill)
    return torch.cat([padded, extra], 1), torch.cat([mask, mask.new_zeros(len(mask), short)], 1)


def length_buckets(sorted_lens: list[int], call_cost: int) -> list[int]:
    """Cut ascending row lengths into right-padded batches of least total cost.

    A batch costs its padded token count plus ``call_cost`` tokens' worth of
    per-call overhead; on a CPU the forward's time follows its token count.

    Returns:
        list of int: end index of each batch, the last one ``len(sorted_lens)``.
    """
    n = len(sorted_lens)
    if n == 0 or call_cost >= n * sorted_lens[-1]:
        return [n] if n else []  # one call costs less than any padding it saves
    best = np.zeros(n + 1, dtype=np.int64)
    cut = np.zeros(n + 1, dtype=np.int64)
    starts = np.arange(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # the last batch is rows i..j-1, padded to row j-1's length
        cost = best[:j] + (j - starts[:j]) * sorted_lens[j - 1] + call_cost
        cut[j] = int(np.argmin(cost))  # the first minimum, as min() over (cost, i)
        best[j] = cost[cut[j]]
    ends = []
    j = n
    while j > 0:
        ends.append(j)
        j = int(cut[j])
    return ends[::-1]


def by_length(
    rows: list[Tensor],
    extra: int,
    call_cost: int,
    score: Callable[[list[Tensor]], Tensor],
    pad: bool = True,
    max_tokens: int | None = None,
    widths: list[int] | None = None,
) -> Tensor:
    """Score rows in groups of similar length, one ``score`` call per group
    (a group wider than ``max_tokens`` padded tokens is cut into several),
    the call of most padded tokens first.

    Args:
        rows (list of Tensor): B rows.
        extra (int): tokens every row gets appended (the target).
        call_cost (int): see :func:`length_buckets`.
        score (callable): ``list of rows -> (b, k)``.
        pad (bool, optional): allow rows of different lengths in one group
            (right padding, exact for causal models only); else each group
            holds rows of one length. Default: True
        max_tokens (int, optional): most padded tokens (rows x width) in one
            call. Default: None (no limit)
        widths (list of int, optional): the tokens each row will push, when
            ``score`` does not push whole rows. Default: the rows' lengths

    Returns:
        Tensor: ``(B, k)`` in the rows' order.
    """
    widths = widths or lengths(rows)
    order = sorted(range(len(rows)), key=lambda i: widths[i])
    lens = [widths[i] for i in order]
    if pad:
        ends = length_buckets([n + extra for n in lens], call_cost)
    else:
        ends = [i + 1 for i in range(len(lens)) if i + 1 == len(lens) or lens[i + 1] != lens[i]]
    chunks, begin = [], 0  # (first, stop, padded tokens), by ascending length
    for end in ends:
        step = rows_within(max_tokens, lens[end - 1] + extra, end - begin)
        for start in range(begin, end, step):
            stop = min(start + step, end)
            chunks.append((start, stop, (stop - start) * (lens[stop - 1] + extra)))
        begin = end
    # The largest call first: the smaller ones after it reuse the memory it freed
    # (see captum_mllm.heap) rather than each growing the process's memory in turn.
    scored = {
        c: score([rows[i] for i in order[c[0] : c[1]]]) for c in sorted(chunks, key=lambda c: -c[2])
    }
    out = torch.cat([scored[c] for c in chunks])
    return out[to_device(torch.argsort(ints(order)), out.device)]


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> ``device`` without waiting for the work queued there: through
    pinned memory on a GPU (a copy from pageable memory waits for the stream,
    so the host could not prepare the next batch while this one runs)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def indices_on(mask: Tensor, device: torch.device) -> Tensor:
    """The positions a host boolean mask holds, as an index tensor on ``device``
    (indexing with it does not wait for the device, as a device mask would)."""
    return to_device(torch.nonzero(mask)[:, 0], device)


def rows_within(max_tokens: int | None, width: int, rows: int) -> int:
    """How many rows of ``width`` tokens one call takes under ``max_tokens`` (at least one)."""
    if max_tokens is None:
        return max(rows, 1)
    return max(1, min(rows, max_tokens // max(width, 1)))


def default_perturbations_per_eval(device: torch.device) -> int:
    """Coalitions handed to an adapter per call when the caller names no
    ``perturbations_per_eval`` (Captum's default, 1, scores one coalition a
    forward). Values never depend on it, the adapter cuts a call to its token
    budget and an out-of-memory halves it; it bounds what a call holds besides
    (every coalition's logits over the vocabulary). 64 on a CPU and 1,024 on
    an accelerator. On a CPU, ``benchmarks/text_vs_captum.py`` gains little
    past 64. On a GPU the model's Python costs milliseconds a forward, which
    fewer, larger forwards spread thinner (``benchmarks/gpu.py``, H100, 1B
    Llama, four runs: exact Shapley 0.226-0.286 ms a coalition at 256,
    0.179-0.200 at 1,024; on an H200, ``--sweep``: 0.146 at 1,024, 0.136 at
    2,048 for 2.7 GiB more, 0.133 at 8,192 for 13.5 GiB more); the log-softmax
    over the vocabulary is taken in chunks (:data:`LOGITS_AT_ONCE`), so its
    float32 copies do not grow with it."""
    return 64 if device.type == "cpu" else 1024


def default_call_cost(device: torch.device, n_params: int = 10_000_000) -> int:
    """Per-forward overhead in tokens. On a CPU a call's fixed cost (Python,
    kernel launches) is ~80 tokens of compute for a 10M-parameter model on 2
    cores (measured), and a token's cost grows with the parameters: the
    overhead counts for more tokens in a smaller model. It is never taken
    below 64 tokens: a CPU matrix product of fewer than a few hundred rows runs
    below full speed (SmolLM2's shapes on 2 cores: 20 rows at about 55% of the
    speed of 800, 100 rows at about 80%; ``benchmarks/cpu_kernels.py``), which
    a large model pays on every small batch. On a GPU a forward of a 1B model
    costs ~10 ms of launches, ~2,000 tokens' worth."""
    if device.type != "cpu":
        return 2048
    return max(64, round(80 * 10_000_000 / max(n_params, 1)))


#: Padded tokens in one forward on the CPU: a 2,000-token row goes 4 at a time.
CPU_TOKEN_BUDGET = 8192


def default_token_budget(device: torch.device, hidden_size: int, element_bytes: int) -> int:
    """Padded tokens one forward may hold: a fixed budget on the CPU; on a GPU
    half its free memory over a generous guess of the live activations per
    token (64 hidden-size vectors). Out-of-memory still halves the batch."""
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    return max(1024, int(0.5 * free / (64 * hidden_size * element_bytes)))
