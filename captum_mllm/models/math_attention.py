"""SDPA's math kernel for transformers' ``"sdpa"`` attention, bit for bit, in
fewer passes over the scores.

Deterministic adapters score padded batches under SDPA's math kernel (its sums
do not change with the padding; see
:attr:`~captum_mllm.models.decoder.DecoderLMAdapter.deterministic`). Since
torch 2.5 that kernel ends with ``_safe_softmax``, which reads the whole
``(B, H, L, S)`` score tensor three more times (``isneginf``, ``all``,
``where``) to give rows that mask every key zeros instead of NaN. On a CPU
with short rows that guard costs about as much as the softmax; on the tiny
LFM2-Audio benchmark it is 8% of an explanation's time.

:func:`math_attention` computes the same products, in the same order, with
the same softmax; masked scores get the dtype's lowest finite value rather
than ``-inf``, so a fully masked row (only ever padding) comes out finite
without the guard, and every other row is the math kernel's to the bit.
With grouped-query attention (several query heads per key/value head) it
multiplies each key/value head's queries together instead of copying the keys
and values once per query head: on the benchmarks' tiny Llama those copies and
the smaller products took 17% of an explanation's time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from captum_mllm.models.batching import MIN_PRODUCT_ROWS
from captum_mllm.process_wide import PROCESS_WIDE


def math_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' ``sdpa_attention_forward`` under SDPA's math kernel, for
    prompts of more than one position (anything else goes to it unchanged).

    Args:
        module (nn.Module): the attention layer (its ``is_causal`` is read, as
            transformers does).
        query, key, value (Tensor): ``(B, H, L, D)``, ``(B, H_kv, S, D)``.
        attention_mask (Tensor or None): boolean (True: attend) or additive,
            broadcastable to ``(B, H, L, S)``; None: causal (or none).
        dropout (float, optional): as transformers'. Default: 0.0
        scaling (float, optional): the score scale. Default: ``D ** -0.5``
        is_causal (bool, optional): as transformers'. Default: the module's

    Returns:
        tuple: ``(B, L, H, D)`` attention output, None (no weights).
    """
    length = query.shape[2]
    if (
        length == 1
        or query.dtype not in (torch.float32, torch.float64)
        or dropout
        or any(kwargs.get(k) is not None for k in ("position_bias", "softcap"))
    ):
        # Decode steps (transformers packs grouped heads there), half precision
        # (which the kernel computes in float32 on a CPU), dropout, position
        # biases and soft-capping (which transformers refuses): the kernel itself.
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
            )
    # Query heads per key/value head, from the shapes: a latent-attention layer
    # (GLM-4 Lite's, Kimi's) hands over keys of every head, whatever its config says.
    groups = query.shape[1] // key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None and causal:  # transformers drops keys past the query (empty static cache)
        key, value = key[:, :, :length], value[:, :, :length]
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    if mask is not None:  # additive, with the lowest finite value for "masked"
        lowest = torch.finfo(query.dtype).min
        if mask.dtype == torch.bool:
            zeros = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device)
            mask = zeros.masked_fill_(~mask, lowest)
        else:
            mask = mask.clamp(min=lowest)
    # The math kernel scales query and key by the square root each, before the product.
    root = math.sqrt(scaling if scaling is not None else query.shape[-1] ** -0.5)
    batch, heads, _, dim = query.shape
    shared_mask = mask is None or mask.dim() == 2 or (mask.dim() == 4 and mask.shape[1] == 1)
    if groups > 1 and length >= MIN_PRODUCT_ROWS and shared_mask:
        # The queries of each key/value head in one product, instead of a copy of
        # the keys and values per head: the same rows, so the same sums (products
        # of 16 rows or more round alike on a CPU; see MIN_PRODUCT_ROWS).
        grouped = (query * root).reshape(batch, heads // groups, groups * length, dim)
        scores = torch.matmul(grouped, key.transpose(-2, -1) * root)
        if mask is not None:
            scores.view(batch, heads // groups, groups, length, -1).add_(mask.unsqueeze(-3))
        out = torch.matmul(scores.softmax(-1), value).view(batch, heads, length, -1)
    else:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        scores = torch.matmul(query * root, key.transpose(-2, -1) * root)
        if mask is not None:
            scores.add_(mask)
        out = torch.matmul(scores.softmax(-1), value)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """SDPA's math kernel, with transformers' ``"sdpa"`` attention computed by
    :func:`math_attention_forward` meanwhile.

    Like ``sdpa_kernel``, this is process-wide until exit: a model run in another
    thread meanwhile gets the math kernel's arithmetic too (another thread's
    captum-mllm call waits for the exit: :data:`~captum_mllm.process_wide.PROCESS_WIDE`).
    Models that keep their own ``"sdpa"`` entry run the math kernel itself.

    Examples::

        >>> with math_attention():
        ...     logits = model(input_ids, attention_mask=mask).logits
    """
    with PROCESS_WIDE:  # another thread's call waits: see process_wide
        previous = cast(Callable[..., Any], AttentionInterface._global_mapping["sdpa"])
        AttentionInterface.register("sdpa", math_attention_forward)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                yield
        finally:
            AttentionInterface.register("sdpa", previous)
