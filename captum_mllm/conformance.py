"""``check_adapter``: the conformance suite every model adapter passes.

In the spirit of scikit-learn's ``check_estimator``: a new adapter is one file
plus one passing ``check_adapter(adapter, chat)``. Each check names what it
found wrong in an :class:`~captum_mllm.errors.AdapterCheckError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_mllm.chat import ROLES, Chat
from captum_mllm.encoding import AUDIO_IN, TEXT, EncodedChat
from captum_mllm.errors import AdapterCheckError
from captum_mllm.inputs import ChatInput
from captum_mllm.models.base import ModelAdapter


def check_adapter(
    adapter: ModelAdapter,
    chat: Chat,
    gen_args: dict[str, Any] | None = None,
    n_coalitions: int = 6,
    atol: float | None = None,
    seed: int = 0,
    **input_kwargs: Any,
) -> list[str]:
    """Check that an adapter keeps the adapter contract on one chat.

    Checks, in order: the position table is consistent; dropping a feature
    removes exactly its positions (and nothing else the model reads);
    batched scoring equals one coalition at a time; scoring token by token
    equals one forward (for a causal model); prefix reuse changes nothing;
    batched generation (greedy, and sampled with per-row seeds) equals one
    coalition at a time. The model runs in eval mode meanwhile.

    Args:
        adapter (ModelAdapter): the adapter under test.
        chat (Chat): a chat it reads; at least two features in all its roles.
        gen_args (dict, optional): generation settings. Default: 4 greedy tokens
        n_coalitions (int, optional): random coalitions to compare. Default: 6
        atol (float, optional): tolerance of score comparisons (log-probabilities).
            Default: 1e-4 for a float32 model; 0.01 in float16 and 0.05 in
            bfloat16, whose rounding alone moves a prefix-reused score that far
        seed (int, optional): seed of the random coalitions. Default: 0
        **input_kwargs: passed to :class:`ChatInput` (units, baselines).

    Returns:
        list of str: the names of the checks that ran.

    Raises:
        AdapterCheckError: the first check that fails, and why.

    Examples::

        >>> from captum_mllm.testing import check_adapter, tiny_hf_adapter
        >>> check_adapter(tiny_hf_adapter(), Chat().system("Be brief.").user("Who are you?"))
        ['position table', 'drop', 'batched scoring', ...]
    """
    if not isinstance(adapter, ModelAdapter):
        raise AdapterCheckError(f"{type(adapter).__name__} is not a ModelAdapter subclass")
    if atol is None:
        dtype = next(adapter.parameters(), torch.empty(0)).dtype
        atol = _ROUNDING.get(dtype, 1e-4)
    input_kwargs.setdefault("roles", ROLES)
    # As attribute runs it: a model left in training mode drops activations at random
    with adapter.evaluating():
        return _run_checks(adapter, chat, gen_args, n_coalitions, atol, seed, input_kwargs)


def _run_checks(
    adapter: ModelAdapter,
    chat: Chat,
    gen_args: dict[str, Any] | None,
    n_coalitions: int,
    atol: float,
    seed: int,
    input_kwargs: dict[str, Any],
) -> list[str]:
    gen = {"max_new_tokens": 4, **(gen_args or {})}
    inp = ChatInput(chat, adapter, **input_kwargs)
    ran = []
    _check_table(adapter.encode(inp.prompt), inp.prompt)
    ran.append("position table")

    g = torch.Generator().manual_seed(seed)
    n = inp.n_itp_features
    masks = (torch.rand(n_coalitions, n, generator=g) > 0.5).float()
    masks[0], masks[-1] = 1.0, 0.0
    masks[-1, 0] = 1.0  # keep one feature: some models cannot read an empty prompt
    _check_drop(adapter, inp)
    ran.append("drop")

    response = adapter.strip_response(adapter.generate_masked(inp.to_model_input(), **gen)[0])
    if len(response) == 0:
        raise AdapterCheckError("the full chat's greedy answer is empty; use another chat")
    masked = inp.to_model_input(masks)
    # A bidirectional model is scored token by token (as attribute does): one
    # forward of the whole answer would let each position read later ones.
    causal = adapter.is_causal
    packed = adapter.score_masked(masked, response, per_step=not causal)
    if packed.shape != (n_coalitions, len(response)):
        raise AdapterCheckError(
            f"score_masked returned {tuple(packed.shape)}, not (B, len(response)) = "
            f"{(n_coalitions, len(response))}"
        )
    single = torch.cat(
        [
            adapter.score_masked(inp.to_model_input(m[None]), response, per_step=not causal)
            for m in masks
        ]
    )
    _close(packed, single, atol, "batched scoring differs from one coalition at a time")
    ran.append("batched scoring")
    if causal:
        by_step = adapter.score_masked(masked, response, per_step=True)
        _close(packed, by_step, atol, "per-step scoring differs from one forward")
        ran.append("per-step scoring")
    prefix = adapter.prefill(inp.to_model_input())
    if prefix is not None:
        reused = adapter.score_masked(masked, response, prefix)
        _close(packed, reused, atol, "prefix reuse changes the scores")
        ran.append("prefix reuse")

    batched = adapter.generate_masked(masked, **gen)
    alone = [adapter.generate_masked(inp.to_model_input(m[None]), **gen)[0] for m in masks]
    if any(not torch.equal(a.ids, b.ids) for a, b in zip(batched, alone, strict=True)):
        raise AdapterCheckError("batched greedy generation differs from one coalition at a time")
    ran.append("batched generation")
    sampled = {**gen, "do_sample": True, "temperature": 1.5}
    seeds = list(range(100, 100 + n_coalitions))
    batched = adapter.generate_masked(masked, seeds=seeds, **sampled)
    alone = [
        adapter.generate_masked(inp.to_model_input(m[None]), seeds=[s], **sampled)[0]
        for m, s in zip(masks, seeds, strict=True)
    ]
    if any(not torch.equal(a.ids, b.ids) for a, b in zip(batched, alone, strict=True)):
        raise AdapterCheckError(
            "a sampled answer depends on the batch: seed each row's generator from seeds[b]"
        )
    ran.append("seeded sampling")
    return ran


def _check_table(enc: EncodedChat, chat: Chat) -> None:
    n = len(enc)
    columns = {
        "modality": len(enc.modality),
        "turn": len(enc.turn),
        "part": len(enc.part),
        "char_start": len(enc.char_start),
        "char_end": len(enc.char_end),
        "special": len(enc.special),
        "tokens": len(enc.tokens),
    }
    wrong = {k: v for k, v in columns.items() if v != n}
    if wrong:
        raise AdapterCheckError(f"position table columns of other lengths than {n}: {wrong}")
    if enc.roles != [t.role for t in chat]:
        raise AdapterCheckError(f"roles {enc.roles} are not the chat's {[t.role for t in chat]}")
    for t, turn in enumerate(chat):
        for p, part in enumerate(turn.parts):
            here = ((enc.turn == t) & (enc.part == p)).nonzero().flatten().tolist()
            text = getattr(part, "text", None)
            if text is not None and text.strip() and not here:
                raise AdapterCheckError(f"turn {t} part {p} ({text[:30]!r}) has no position")
            if text is None and not all(enc.modality[i] == AUDIO_IN for i in here):
                raise AdapterCheckError(f"turn {t} part {p} is audio but holds text positions")
            for i in here:
                if enc.modality[i] != TEXT:
                    continue
                start, end = int(enc.char_start[i]), int(enc.char_end[i])
                if not 0 <= start <= end <= len(enc.part_texts[(t, p)]):
                    raise AdapterCheckError(f"position {i} spans {start}..{end}, outside its part")
    if bool(((enc.part >= 0) & (enc.turn < 0)).any()):
        raise AdapterCheckError("a content position belongs to no turn")


def _check_drop(adapter: ModelAdapter, inp: ChatInput) -> None:
    """Dropping feature f leaves exactly the other positions, in order."""
    full = adapter.masked_inputs(inp.to_model_input())[0]
    if len(full) != len(inp.encoded):
        raise AdapterCheckError(
            f"the full coalition reads {len(full)} positions; the table has {len(inp.encoded)}"
        )
    drops = {"text": inp.baseline == "drop", "audio_in": inp.audio_baseline == "drop"}
    for f, feature in enumerate(inp.features):
        dropping = drops.get(feature.modality, drops["text"] and drops["audio_in"])
        coalition = torch.ones(1, inp.n_itp_features)
        coalition[0, f] = 0
        row = adapter.masked_inputs(inp.to_model_input(coalition))[0]
        keep = torch.ones(len(inp.encoded), dtype=torch.bool)
        keep[list(feature.positions)] = False
        if dropping:
            expected = full[keep.to(full.device)]
            if not torch.equal(row, expected):
                raise AdapterCheckError(
                    f"dropping feature {f} ({feature.label!r}) does not remove exactly its "
                    f"{len(feature.positions)} positions (read {len(row)} of {len(full)})"
                )
        elif len(row) != len(full) or torch.equal(row, full):
            raise AdapterCheckError(f"replacing feature {f} ({feature.label!r}) changes nothing")


#: Default tolerances of reduced-precision models: their rounding, at
#: log-probabilities of a few nats.
_ROUNDING = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _close(a: Tensor, b: Tensor, atol: float, message: str) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=0):
        gap = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
        raise AdapterCheckError(f"{message} (largest gap {gap:.2e})")
