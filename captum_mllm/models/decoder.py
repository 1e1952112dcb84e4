"""What both decoder-LM adapters share: teacher-forced scoring in one forward or
token by token, packed or in length buckets, batched generation, and hidden
states over responses (the prefix's cache is :mod:`~captum_mllm.models.prefix_cache`'s,
per-row seeded sampling :mod:`~captum_mllm.models.sampling`'s).

An adapter built on :class:`DecoderLMAdapter` says how a coalition becomes
model inputs (token ids or embeddings) and how one batch is scored; the loop,
the length buckets and the per-step mode live here once.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from captum_mllm.encoding import EncodedChat, MaskedChat
from captum_mllm.errors import InvalidOptionError, require_int
from captum_mllm.models.base import ModelAdapter, Response
from captum_mllm.models.batching import (
    MIN_PRODUCT_ROWS,
    by_length,
    default_call_cost,
    default_token_budget,
    enough_rows,
    lengths,
    rows_within,
)
from captum_mllm.models.math_attention import math_attention
from captum_mllm.models.packing import PackedRows, packed_layers
from captum_mllm.models.prefix_cache import shares
from captum_mllm.models.sampling import check_sampling
from captum_mllm.process_wide import PROCESS_WIDE


def same_outputs(got: Tensor, want: Tensor) -> bool:
    """Whether two computations of the same outputs agree to their dtype's
    rounding (relative to the largest), as a probe of a model's behaviour."""
    tolerance = 1e-4 if want.dtype in (torch.float32, torch.float64) else 3e-2
    return bool((got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max())


def _widths(rows: list[Tensor], prefix: Any) -> list[int]:
    """Tokens each row pushes: its length, less what it reads from ``prefix``."""
    if not shares(prefix):
        return lengths(rows)
    return [w - n for w, n in zip(lengths(rows), prefix.leads(rows), strict=True)]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> the first GPU when there is one, else the CPU. A device
    this machine lacks is refused here, before a model's weights load (they
    loaded, or the default model was converted, before torch refused it)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.device(device)
    count_devices = getattr(getattr(torch, where.type, None), "device_count", None)
    count = count_devices() if count_devices is not None else None  # None: meta, ...
    if count is not None and (where.index or 0) >= count:
        has = f"{count} {where.type} device{'s' * (count != 1)}" if count else f"no {where.type}"
        raise InvalidOptionError(f"device {str(device)!r}: this machine has {has}")
    return where


#: Rows longer than this many tokens are scored one at a time when deterministic.
LONG_ROW = 1024

#: The SDPA kernels the adapters' forwards may use: the fused ones and the math
#: kernel, never cuDNN's. torch 2.11 sends attention on Hopper and later GPUs
#: to cuDNN first, and cuDNN builds an execution plan for every (rows, width)
#: it has not seen, tens of milliseconds each, while an explanation's batches
#: come in ever new widths, and generation's in a new width every step (on an
#: H100, ``benchmarks/gpu.py``'s "new shapes" rows: 0.34 ms a coalition on the
#: 1B Llama, 0.88 ms with cuDNN allowed). On a CPU this is the default choice.
ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def without_cudnn_attention(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` with SDPA limited to :data:`ATTENTION_KERNELS` (a
    deterministic adapter's math kernel still applies inside)."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with PROCESS_WIDE, sdpa_kernel(ATTENTION_KERNELS):  # see process_wide
            return method(*args, **kwargs)

    return run


class DecoderLMAdapter(ModelAdapter):
    """Shared behaviour of decoder-only LM adapters (see the module docstring)."""

    #: Per-forward overhead in tokens for grouping rows by length; None: the
    #: device's default (:func:`~captum_mllm.models.batching.default_call_cost`).
    call_cost: int | None = None

    #: A coalition's value does not depend on the batch it was evaluated in, to
    #: the bit: attention through SDPA's math kernel (exact under any padding
    #: width; the fused CPU kernel is not), matrix products of enough rows
    #: (:data:`~captum_mllm.models.batching.MIN_PRODUCT_ROWS`) and generation
    #: in groups of equal length (left padding shifts the sums). None: on the
    #: CPU only.
    deterministic: bool | None = None

    #: Whether the model continues a prefix's cache as a whole forward does
    #: (probed on the first prefill); None: not probed yet.
    _continues_cache: bool | None = None

    #: Whether the model reads shared prefix positions right (probed on the
    #: first prefill; see :attr:`PrefixCache.shared`). None: not probed yet.
    _shares_leads: bool | None = None

    #: Most padded tokens (rows x width) in one forward; None: the device's
    #: default (:func:`~captum_mllm.models.batching.default_token_budget`).
    max_batch_tokens: int | None = None

    #: Score each batch's rows packed end to end in one row, so that no matrix
    #: product multiplies padding (:mod:`~captum_mllm.models.packing`), where
    #: the adapter can and the model passes its probe; the values stay those of
    #: right-padded batches. False: right-padded batches always.
    packing: bool = True

    #: Whether this model passed the packing probe; None: not probed yet.
    _packs: bool | None = None

    #: The keyword of the decoder's forward that takes the key/value cache
    #: (:func:`cache_kwarg`), set by each adapter.
    _cache_kwarg: str

    def packs(self) -> bool:
        """Whether batches are scored packed: :attr:`packing` is on, and the
        adapter packs this model's rows as it pads them on a probe run once
        (to the bit when :attr:`deterministic`). A model whose forward does
        not pass ``packed_rows`` on to its layers, or that reads across
        positions where the packing does not know (sliding windows, other
        recurrences), fails it."""
        if not self.packing:
            return False
        if self._packs is None:
            try:
                with torch.inference_mode(), self._attention():
                    pair = self._packing_probe()
            except (TypeError, ValueError, RuntimeError):
                pair = None
            same = torch.equal if self.is_deterministic else same_outputs
            self._packs = pair is not None and bool(same(*pair))
        return self._packs

    def _packed_forward(
        self, decoder: nn.Module, layout: PackedRows, prefix: Any, **inputs: Any
    ) -> Any:
        """``decoder``'s output for rows packed as ``layout`` (``input_ids`` or
        ``inputs_embeds`` in ``inputs``), after the prefix's cache if any."""
        kwargs: dict[str, Any] = {"use_cache": prefix is not None}
        if prefix is not None:
            kwargs[self._cache_kwarg] = prefix.expand(1)
        with packed_layers():
            return decoder(
                attention_mask=layout.mask,
                position_ids=layout.positions,
                packed_rows=layout,
                **inputs,
                **kwargs,
            )

    def _packing_probe(self) -> tuple[Tensor, Tensor] | None:
        """Packed and right-padded scores of a few probe rows (of 3, 9 and 20
        positions, sharing their starts), alone and after a prefix read from the
        model's cache; None: the adapter cannot pack this model."""
        return None

    @functools.cached_property
    def _n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def token_budget(self) -> int:
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        weight = next(self.parameters())
        return default_token_budget(self.device, self.hidden_size, weight.element_size())

    @property
    def hidden_size(self) -> int:
        """Width of the model's hidden states (sizes the GPU token budget)."""
        config = getattr(getattr(self, "model", None), "config", None)
        return int(getattr(config, "hidden_size", None) or 4096)

    @property
    def is_deterministic(self) -> bool:
        if self.deterministic is None:
            return self.device.type == "cpu"
        return self.deterministic

    def _attention(self) -> Any:
        """The attention kernel padded batches run under (see :attr:`deterministic`)."""
        return math_attention() if self.is_deterministic else contextlib.nullcontext()

    @abstractmethod
    def _coalition_rows(self, masked: MaskedChat, prefix: Any) -> list[Tensor]:
        """Model inputs of each coalition after the prefix: ids ``(L_b,)`` or
        embeddings ``(L_b, D)``."""

    @abstractmethod
    def _fed(self, response: Response) -> Tensor:
        """Model inputs of the response's tokens, in the layout of the rows."""

    @abstractmethod
    def _score_rows(
        self,
        rows: list[Tensor],
        response: Response,
        first: int,
        last: int,
        prefix: Any,
        feed_all: bool = False,
    ) -> Tensor:
        """Log-probabilities ``(B, last - first)`` of response tokens
        ``first..last-1``; each row already ends with the first ``first`` of them.
        The tokens scored are fed but the last; all of them with ``feed_all``
        (Captum's one-forward path on a model that is not causal)."""

    @abstractmethod
    def _generate(
        self, masked: MaskedChat, seeds: list[int] | None = None, **gen_args: Any
    ) -> list[Response]:
        """:meth:`generate_masked` of one batch, left-padded."""

    @abstractmethod
    def _context_rows(self, context: EncodedChat) -> Tensor:
        """Model inputs of a whole encoded chat."""

    @abstractmethod
    def _last_hidden(self, rows: list[Tensor]) -> Tensor:
        """Right-padded forward of rows: last hidden states ``(B, W, d)``."""

    def pushed_lengths(self, masked: MaskedChat, prefix: Any = None) -> Tensor:
        """As the base adapter's, less the positions each row reads from the
        prefix cache's shared ones (its leading run of present positions)."""
        lengths = super().pushed_lengths(masked, prefix)
        if not shares(prefix):
            return lengths
        after = masked.present[:, prefix.length :]
        run = after[:, : len(prefix.shared)].long().cumprod(1).sum(1)
        return lengths - torch.minimum(run, (after.sum(1) - 1).clamp(min=0))

    def masked_inputs(self, masked: MaskedChat) -> list[Tensor]:
        """What the model reads for each coalition (no prefix reuse)."""
        return self._coalition_rows(masked, None)

    def score_masked(
        self,
        masked: MaskedChat,
        response: Response,
        prefix: Any = None,
        per_step: bool = False,
    ) -> Tensor:
        """Teacher-forced log-probability of each response token after each coalition.

        Causal models take rows right-padded and grouped by length, the whole
        response in one forward (or one token per forward with ``per_step``).
        Models not known to be causal see only rows of equal length together,
        so padding never reaches their outputs.

        Returns:
            Tensor: ``(B, len(response))`` float32.
        """
        return self.score_rows(self._coalition_rows(masked, prefix), response, prefix, per_step)

    @without_cudnn_attention
    def generate_masked(
        self, masked: MaskedChat, seeds: list[int] | None = None, **gen_args: Any
    ) -> list[Response]:
        """Continue each coalition (greedy, or sampled with ``do_sample``), batched;
        when :attr:`deterministic`, in groups of rows of one length, so that
        no row is ever padded and its answer never depends on the others.

        Args:
            masked (MaskedChat): B coalitions.
            seeds (list of int, optional): one seed per coalition.
            **gen_args: generation settings.

        Returns:
            list of Response: B responses, each up to and including its end token.
        """
        lens = [len(row) for row in self.masked_inputs(masked)]
        groups: dict[int, list[int]] = {}
        for b, n in enumerate(lens):
            groups.setdefault(n if self.is_deterministic else 0, []).append(b)
        new = require_int("max_new_tokens", gen_args.get("max_new_tokens", 25), 1)
        check_sampling(gen_args)
        out: list[Response | None] = [None] * len(masked)
        # Deterministic groups hold rows of one length, never padded; their
        # products and attention are made independent of the group's size too.
        for rows in groups.values():
            width = max(lens[b] for b in rows)
            step = rows_within(self.token_budget, width + new, len(rows))
            if self.is_deterministic and width > LONG_ROW:
                step = 1  # the fused kernel, one row at a time (see _padded_batches)
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                part = replace(masked, present=masked.present[chunk])
                picked = [seeds[b] for b in chunk] if seeds else None
                with self._generation_kernels(width, len(chunk)):
                    answers = self._generate(part, picked, **gen_args)
                for b, r in zip(chunk, answers, strict=True):
                    out[b] = r
        return [r for r in out if r is not None]

    def _generation_kernels(self, width: int, rows: int) -> contextlib.AbstractContextManager[Any]:
        """When :attr:`deterministic`: matrix products of enough rows
        (:func:`~captum_mllm.models.batching.enough_rows`; ``rows`` prompts
        continued together are that many rows in every step) and, for rows up
        to :data:`LONG_ROW` tokens, SDPA's math kernel (the fused CPU kernel's
        decode steps round by the number of rows)."""
        stack = contextlib.ExitStack()
        if self.is_deterministic:
            if rows < MIN_PRODUCT_ROWS:
                stack.enter_context(enough_rows(self))
            if width <= LONG_ROW:
                stack.enter_context(self._attention())
        return stack

    @without_cudnn_attention
    def score_rows(
        self,
        rows: list[Tensor],
        response: Response,
        prefix: Any = None,
        per_step: bool = False,
        **inputs: Any,
    ) -> Tensor:
        """:meth:`score_masked` for rows of model inputs built elsewhere (e.g.
        token ids from Captum's own inputs). ``inputs`` go to every batch's
        :meth:`_score_rows` (an adapter's own, such as the table of vectors
        LFM2-Audio's rows of ids index). Returns ``(B, len(response))``."""
        fed = self._fed(response) if per_step else None  # grows the rows step by step
        n = len(response)
        steps = [(t, t + 1) for t in range(n)] if per_step else [(0, n)]
        out = []
        for first, last in steps:
            # (B, L_b) rows + the first `first` response tokens -> (B, last - first)
            grown = rows
            if fed is not None and first:
                grown = [torch.cat([r, fed[:first].to(r.device, r.dtype)]) for r in rows]
            score = functools.partial(
                self._score_rows,
                response=response,
                first=first,
                last=last,
                prefix=prefix,
                feed_all=not per_step and not self.is_causal,
                **inputs,
            )
            out.append(self._padded_batches(grown, last - first, score, _widths(grown, prefix)))
        return torch.cat(out, dim=1)

    @without_cudnn_attention
    def response_states(
        self, responses: list[Response], context: EncodedChat | None = None
    ) -> list[Tensor]:
        """Last hidden states over each response, ``(n_i, d)``, read alone or
        after ``context`` (the full chat), in one right-padded forward."""
        lead = self._context_rows(context) if context is not None else None
        rows = []
        for r in responses:
            fed = self._fed(r)
            rows.append(fed if lead is None else torch.cat([lead, fed.to(lead.dtype)]))
        start = 0 if lead is None else len(lead)
        if self.is_deterministic and max(len(r) for r in rows) > LONG_ROW:
            states = [self._last_hidden([r])[0].float() for r in rows]  # see _padded_batches
        else:
            with self._attention():
                states = list(self._last_hidden(rows).float())
        self.n_forward_calls += 1
        return [h[start : start + len(r)] for h, r in zip(states, responses, strict=True)]

    def _padded_batches(
        self,
        rows: list[Tensor],
        extra: int,
        score: Callable[[list[Tensor]], Tensor],
        widths: list[int],
    ) -> Tensor:
        """Rows scored in length buckets (by ``widths``, the tokens each row
        pushes) under the token budget. When :attr:`deterministic`, padded
        batches run SDPA's math kernel, whose sums no padding changes; rows
        longer than :data:`LONG_ROW` tokens go one at a time through the fused
        kernel instead (its memory grows linearly with length, the math
        kernel's quadratically; on a CPU a row that long gains nothing from
        batching)."""
        call_cost = self.call_cost or default_call_cost(self.device, self._n_params)
        if self.packs():  # padding costs only attention's places: one call per budget
            call_cost = sys.maxsize
        budget = self.token_budget
        pad = self.is_causal
        if not self.is_deterministic:
            return by_length(rows, extra, call_cost, score, pad, budget, widths)
        long = {i for i, w in enumerate(widths) if w + extra > LONG_ROW}
        short = [i for i in range(len(rows)) if i not in long]
        out: list[Tensor | None] = [None] * len(rows)
        if short:
            with self._attention():
                values = by_length(
                    [rows[i] for i in short],
                    extra,
                    call_cost,
                    score,
                    pad,
                    budget,
                    [widths[i] for i in short],
                )
            for i, v in zip(short, values, strict=True):
                out[i] = v
        for i in sorted(long):
            out[i] = score([rows[i]])[0]
        return torch.stack([v for v in out if v is not None])
