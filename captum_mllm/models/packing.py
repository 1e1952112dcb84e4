"""Packed rows: a batch of coalitions laid end to end in one row, so that no
matrix product of the model multiplies padding.

Only attention reads across positions in a plain decoder (Llama, SmolLM2,
Qwen and the like); every other layer works position by position. So the
packed row goes through the model as one sequence, and each attention layer
alone spreads its queries, keys and values back out into the right-padded
layout the padded path would have built (:meth:`PackedRows.spread`), runs the
attention kernel it would have run there, and gathers the outputs back. A
coalition's value is then what the padded path gives it, to the bit where the
padded path is batch-invariant (the math kernel's sums do not change with
padding; products of enough rows round alike), while the products, nearly all
of a forward's work, see only real positions. Rows that begin alike share
those positions (:meth:`PackedRows.of`), as rows that begin as the full chat
read them from the prefix cache.

Where transformers' own ``"sdpa"`` attention would run (a GPU, or an adapter
that is not deterministic), the spread-out attention puts each key/value
head's query heads in that head's rows (:func:`grouped_attention`) instead of
copying the keys and values once per query head, as transformers does whenever
a mask is given on CUDA.

LFM2's short convolutions read the two positions before each one: within
:func:`packed_layers` they are spread into the padded layout too, after the
prefix's convolution state, as the padded path runs them. Models with other
layers that read across positions (sliding-window attention, other
recurrences) cannot be packed this way; adapters probe a model before packing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from captum_mllm.models.batching import MIN_PRODUCT_ROWS, ints, lengths, to_device
from captum_mllm.process_wide import PROCESS_WIDE


@dataclass(frozen=True)
class PackedRows:
    """Where each of B rows lies in a packed row of N positions, and the
    right-padded layout attention reads them in: B rows of W places after C
    cached positions (a prefix every row shares).

    Attributes:
        places (Tensor): ``(B, W)`` packed position of each place (0 at
            padding), on the host.
        positions (Tensor): ``(1, N)`` position ids.
        queries (Tensor): ``(B * W,)`` :attr:`places` on the model's device.
        keys (Tensor): ``(B * (C + W),)`` key at each place: the cache's C, then
            the packed positions shifted by C (0 at padding).
        unpack (Tensor): ``(N,)`` a place of each packed position (0 for the
            positions appended to reach :data:`MIN_PRODUCT_ROWS`).
        mask (Tensor): ``(B, 1, W, C + W)`` boolean, True: attend.
        real (int): packed positions the rows hold (the others only make the
            packed row :data:`MIN_PRODUCT_ROWS` long).
    """

    places: Tensor
    positions: Tensor
    queries: Tensor
    keys: Tensor
    unpack: Tensor
    mask: Tensor
    real: int
    #: Built once per forward and read by every layer (:meth:`grouped_mask`).
    _built: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        rows: list[Tensor],
        cached: int = 0,
        seen: list[int] | None = None,
        first_positions: list[int] | None = None,
        fill: int = 0,
        device: torch.device | None = None,
        suffix: Tensor | None = None,
    ) -> tuple[PackedRows, Tensor]:
        """Rows of token ids laid end to end. A row that begins as another row
        (the same first ids, the same first position and the same cached
        positions seen) shares those positions with it instead of pushing them
        again: what a position holds depends only on the positions before it
        (a prefix trie over the batch, without its cost: attention reads each
        row's keys through :attr:`keys` anyway).

        Args:
            rows (list of Tensor): B rows of ids ``(L_b,)``.
            cached (int, optional): C, positions already in the model's cache. Default: 0
            seen (list of int, optional): how many of the cached positions each
                row attends to. Default: all C
            first_positions (list of int, optional): position id of each row's
                first position. Default: C
            fill (int, optional): the id appended to reach
                :data:`MIN_PRODUCT_ROWS` positions. Default: 0
            device (torch.device, optional): where the layout and the ids go.
                Default: the CPU
            suffix (Tensor, optional): ``(S,)`` ids that follow every row (the
                answer fed after each coalition). Default: None

        Returns:
            tuple: the layout, and the packed ids ``(1, N)``.
        """
        device = device or torch.device("cpu")
        n_rows = len(rows)
        lens = ints(lengths(rows))
        extra = 0 if suffix is None else len(suffix)
        width = max(int(lens.max()) + extra if n_rows else 0, MIN_PRODUCT_ROWS)
        place = torch.arange(width)[None]
        # The rows laid into a (B, W) grid in one write (-1: no id); pad_sequence
        # copies row by row, several times slower for a thousand short rows.
        grid = torch.full((n_rows, width), -1, dtype=torch.long)
        if n_rows:
            grid.masked_scatter_(place < lens[:, None], torch.cat(rows).cpu().long())
        if suffix is not None and extra:  # the suffix after each row, as one index
            after = lens[:, None] + torch.arange(extra)[None]
            grid.scatter_(1, after, suffix.cpu().long()[None].expand(n_rows, -1))
            lens = lens + extra
        reads = ints(seen if seen is not None else [cached] * n_rows)
        first = ints(first_positions if first_positions is not None else [cached] * n_rows)
        # Sorted by (first position, cached positions seen, ids), a row's longest
        # shared start is with the row before it.
        order = torch.from_numpy(
            np.lexsort(np.vstack([grid.numpy()[:, ::-1].T, reads.numpy(), first.numpy()]))
        )
        ids = grid[order]
        alike = (first[order][1:] == first[order][:-1]) & (reads[order][1:] == reads[order][:-1])
        same = ids[1:] == ids[:-1]
        shared = torch.cat(
            [torch.zeros(1, dtype=torch.long), same.long().cumprod(1).sum(1) * alike]
        )
        new = (ids >= 0) & (place >= shared[:, None])  # the places that push a position
        pushed = new.flatten().cumsum(0).reshape(new.shape) - 1
        owner = torch.where(new, torch.arange(n_rows)[:, None], -1).cummax(0).values
        places = torch.zeros(n_rows, width, dtype=torch.long)
        places[order] = torch.where(ids >= 0, pushed[owner.clamp(min=0), place], 0)
        n = int(new.sum())
        ids = ids[new]
        real = place < lens[:, None]  # (B, W)
        held = real.flatten().nonzero()[:, 0]  # flat index (row * W + place) of each real place
        at = places.flatten()[held]
        unpack = torch.zeros(n, dtype=torch.long)  # any place of a position holds its state
        unpack[at] = held
        positions = torch.zeros(n, dtype=torch.long)
        positions[at] = (first[:, None] + place).flatten()[held]
        short = MIN_PRODUCT_ROWS - n
        if short > 0:  # positions only the products see; nothing reads them
            unpack = torch.cat([unpack, unpack.new_zeros(short)])
            positions = torch.cat([positions, positions.new_zeros(short)])
            ids = torch.cat([ids, ids.new_full((short,), fill)])
        keys = torch.cat([torch.arange(cached).expand(n_rows, -1), cached + places], 1)
        # Key k is the cache's for k < C (seen by a row up to its reads), else
        # place k - C, seen by the row's own real places up to the query's.
        key = torch.arange(cached + width)[None]
        mine = torch.where(key < cached, key < reads[:, None], key - cached < lens[:, None])
        causal = key - cached <= torch.arange(width)[:, None]  # (W, C + W)
        mask = (mine[:, None] & causal[None])[:, None]
        layout = cls(
            places=places,
            positions=to_device(positions[None], device),
            queries=to_device(places.reshape(-1), device),
            keys=to_device(keys.reshape(-1), device),
            unpack=to_device(unpack, device),
            mask=to_device(mask, device),
            real=n,
        )
        return layout, to_device(ids[None], device)

    @property
    def width(self) -> int:
        """W, the places of each row in the padded layout."""
        return int(self.mask.shape[2])

    def predicting(self, sizes: list[int], n: int) -> Tensor:
        """``(B, n)`` host index of the packed positions that predict ``n``
        items after each row's first ``sizes[b]`` places (its last input place
        and the ``n - 1`` items fed after it; place 0 for a row of no input)."""
        index = ints(sizes)[:, None] - 1 + torch.arange(n)[None]
        return self.places.gather(1, index.clamp(min=0))

    def spread(self, x: Tensor, index: Tensor) -> Tensor:
        """``(1, H, M, D)`` packed queries, keys or values -> ``(B, H, W', D)``,
        the places of ``index`` (:attr:`queries` or :attr:`keys`)."""
        return x[0].index_select(1, index).unflatten(1, (len(self.places), -1)).transpose(0, 1)

    def grouped_mask(self, groups: int, dtype: torch.dtype) -> Tensor:
        """:attr:`mask` as an additive ``(B, 1, W * groups, C + W)`` mask of
        ``dtype`` whose row ``w * groups + g`` is row ``w``'s (0: attend), for
        :func:`grouped_attention`. Its rows are laid 16 values apart, as SDPA's
        memory-efficient kernel reads them (it would pad a copy in every layer)."""
        key = ("mask", groups, dtype)
        if key not in self._built:
            rows, _, width, n_keys = self.mask.shape
            shape = (rows, 1, width * groups, -(-n_keys // 16) * 16)
            wide = torch.zeros(shape, dtype=dtype, device=self.mask.device)[..., :n_keys]
            masked = ~self.mask.repeat_interleave(groups, dim=2)
            self._built[key] = wide.masked_fill_(masked, float("-inf"))
        return cast(Tensor, self._built[key])

    def unpacking(self) -> tuple[Tensor, Tensor]:
        """The row and the place of :attr:`unpack`, on its device."""
        if "unpack" not in self._built:
            self._built["unpack"] = (self.unpack // self.width, self.unpack % self.width)
        return cast(tuple[Tensor, Tensor], self._built["unpack"])


def grouped_attention(
    rows: PackedRows,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> Tensor:
    """SDPA over the padded layout of packed queries, keys and values, with the
    G query heads of each key/value head as G times as many query rows of that
    head, instead of a copy of the keys and values for each query head (what
    transformers' ``"sdpa"`` attention does whenever a mask is given on CUDA).

    Args:
        rows (PackedRows): the layout.
        query (Tensor): ``(1, H, M, D)`` packed queries, ``H = H_kv * G``.
        key, value (Tensor): ``(1, H_kv, C + M, D)`` the cache's, then the packed positions'.
        dropout (float, optional): SDPA's dropout. Default: 0.0
        scaling (float, optional): the score scale. Default: ``D ** -0.5``

    Returns:
        Tensor: ``(1, M', H, D)``, the output at each packed position.
    """
    kv_heads, dim = key.shape[1], query.shape[-1]
    groups = query.shape[1] // kv_heads
    n_rows, width = rows.places.shape
    # (H_kv, M, G, D) gathered at the places: row w * G + g of a head is query head g at place w
    grouped = query[0].unflatten(0, (kv_heads, groups)).transpose(1, 2)
    grouped = grouped.index_select(1, rows.queries).view(kv_heads, n_rows, width * groups, dim)
    out = F.scaled_dot_product_attention(
        grouped.transpose(0, 1),
        rows.spread(key, rows.keys),
        rows.spread(value, rows.keys),
        attn_mask=rows.grouped_mask(groups, query.dtype),
        dropout_p=dropout,
        scale=scaling,
    )  # (B, H_kv, W * G, D)
    row, place = rows.unpacking()
    picked = out.unflatten(2, (width, groups))[row, :, place]  # (M', H_kv, G, D)
    return picked.reshape(1, len(row), kv_heads * groups, -1)


def distinct_ids(rows: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Rows of input vectors ``(L_b, D)`` as rows of ids into a table of their
    distinct vectors (equal to the bit), so that :meth:`PackedRows.of` finds
    the rows that begin alike.

    Each vector's bits are hashed to one integer and the integers made unique
    (``torch.unique`` over whole vectors sorts them, several times slower); the
    table is checked against every vector, bit for bit, and a hash collision
    falls back to that sort.

    Returns:
        tuple: the id rows, and the table ``(U, D)`` (``table[ids]`` gives the vectors back).
    """
    flat = torch.cat(rows)
    bits = flat.contiguous().view(
        {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    )
    _, inverse = torch.unique(hash_bits(bits), return_inverse=True)
    first = _first_of(inverse)
    if not torch.equal(bits[first][inverse], bits):  # a collision: sort the vectors themselves
        _, inverse = torch.unique(bits, dim=0, return_inverse=True)
        first = _first_of(inverse)
    return list(inverse.cpu().split(lengths(rows))), flat[first]


def hash_bits(bits: Tensor) -> Tensor:
    """``(N, D)`` integers -> ``(N,)`` 64-bit hashes (a fixed random linear map)."""
    weights = torch.randint(1, 2**62, (bits.shape[1],), generator=torch.Generator().manual_seed(0))
    return (bits.long() * weights.to(bits.device)).sum(1)


def _first_of(inverse: Tensor) -> Tensor:
    """For each id of ``inverse``, an index that holds it."""
    first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=inverse.device)
    return first.scatter_(0, inverse, torch.arange(len(inverse), device=inverse.device))


def packed_attention_forward(inner: Callable[..., Any]) -> Callable[..., Any]:
    """An attention function that runs ``inner`` on the padded layout of
    the ``packed_rows`` it is given (see the module docstring); without
    ``packed_rows`` it is ``inner``."""

    def forward(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        *args: Any,
        packed_rows: PackedRows | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        if packed_rows is None:
            return cast(
                tuple[Tensor, Any],
                inner(module, query, key, value, attention_mask, *args, **kwargs),
            )
        if kwargs.get("sliding_window") is not None:
            raise ValueError("packed rows cannot take sliding-window attention")
        rows = packed_rows
        if inner is sdpa_attention_forward and not args and _plain(kwargs):
            dropout, scaling = kwargs.get("dropout", 0.0), kwargs.get("scaling")
            return grouped_attention(rows, query, key, value, dropout, scaling), None
        out, weights = inner(
            module,
            rows.spread(query, rows.queries),
            rows.spread(key, rows.keys),
            rows.spread(value, rows.keys),
            rows.mask,
            *args,
            **kwargs,
        )  # (B, W, H, D)
        return out.reshape(-1, *out.shape[2:]).index_select(0, rows.unpack)[None], weights

    return forward


def _plain(kwargs: dict[str, Any]) -> bool:
    """Whether transformers' ``"sdpa"`` attention would run plain SDPA on these
    keywords (no position bias, soft-capping or attention weights asked for)."""
    bias = ("position_bias", "softcap", "s_aux")
    return all(kwargs.get(k) is None for k in bias) and not kwargs.get("output_attentions")


def packed_convolution(inner: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' causal convolution of LFM2's short-convolution layers,
    run on the padded layout of the ``packed_rows`` it is given (each row after
    the convolution state the cache holds, as the padded path runs it);
    without ``packed_rows`` it is ``inner``."""

    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        activation: str | None = None,
        packed_rows: PackedRows | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if packed_rows is None:
            return cast(Tensor, inner(x, weight, bias, activation, **kwargs))
        rows, n_rows = packed_rows, len(packed_rows.places)
        state = x.shape[-1] - len(rows.unpack)  # the cache's columns before the packed row
        spread = x[0, :, state:].index_select(1, rows.queries).unflatten(1, (n_rows, -1))
        padded = torch.cat([x[:, :, :state].expand(n_rows, -1, -1), spread.transpose(0, 1)], 2)
        out = inner(padded, weight, bias, activation)[:, :, state:]  # (B, D, W)
        packed = out.transpose(0, 1).flatten(1).index_select(1, rows.unpack)
        return torch.cat([x.new_zeros(1, x.shape[1], state), packed[None]], 2)

    return forward


@contextlib.contextmanager
def packed_layers() -> Iterator[None]:
    """Within: transformers' ``"sdpa"`` attention (whatever is registered
    under that name, e.g. :func:`~captum_mllm.models.math_attention.math_attention`'s)
    and LFM2's causal convolution understand a ``packed_rows=`` keyword passed
    through the model's forward.

    Like ``sdpa_kernel``, this is process-wide until exit (another thread's
    captum-mllm call waits for it: :mod:`~captum_mllm.process_wide`).

    Examples::

        >>> rows, ids = PackedRows.of([torch.tensor([5, 6, 7]), torch.tensor([5, 6, 9, 4])])
        >>> with packed_layers():
        ...     hidden = decoder(input_ids=ids, attention_mask=rows.mask,
        ...                      position_ids=rows.positions, packed_rows=rows)[0]
    """
    from transformers.models.lfm2 import modeling_lfm2

    with PROCESS_WIDE:  # another thread's call waits: see process_wide
        attention = cast(Callable[..., Any], AttentionInterface._global_mapping["sdpa"])
        convolution = modeling_lfm2.causal_conv1d_fn
        AttentionInterface.register("sdpa", packed_attention_forward(attention))
        modeling_lfm2.causal_conv1d_fn = packed_convolution(convolution)  # type: ignore[assignment]
        try:
            yield
        finally:
            AttentionInterface.register("sdpa", attention)
            modeling_lfm2.causal_conv1d_fn = convolution  # type: ignore[assignment]
